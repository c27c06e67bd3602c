"""The Horovod transport: ``horovod.torch`` collectives on uint8/int64/float tensors,
honouring a process set.  Imported only when chosen."""
from __future__ import annotations

import numpy as np

from ..kernels.xp import is_cupy
from .base import Transport, TransportError

LAUNCH_HINT = ("launch with `horovodrun -np N python your_script.py` and call "
               "`hvd.init()` (import horovod.torch as hvd) before creating the transport")


def import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise TransportError(f"the Horovod transport needs horovod.torch, which does not import "
                             f"({exc}); install it with `make setup`, or use transport='mpi'") from exc
    return hvd


#: process sets added for sub-groups (the hierarchical vote), per member list
_PROCESS_SETS = {}


class HorovodTransport(Transport):
    """Collectives through Horovod on ``process_set`` (default: all ranks)."""

    name = "horovod"
    background_progress = True   # Horovod's own thread moves the data

    def __init__(self, process_set=None):
        super().__init__()
        hvd = import_horovod()
        if not hvd.is_initialized():
            raise TransportError("Horovod is not initialised: " + LAUNCH_HINT)
        self.hvd = hvd
        import torch
        self.torch = torch
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        if self.process_set.rank() is None:
            raise TransportError("this rank is not a member of the given Horovod process set")
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        try:  # make a rank that dies take the whole job down, as for the MPI transport
            if hvd.mpi_enabled():
                from mpi4py import MPI
                from .mpi import install_abort_on_error
                install_abort_on_error(MPI.COMM_WORLD)
        except ImportError:
            pass

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def barrier(self):
        self.hvd.barrier(process_set=self.process_set)

    # -- sub-groups (the hierarchical vote, ``signcomm.hierarchy``) ----------------------
    def split(self, color: int, key: int, *, tag=None) -> "HorovodTransport":
        """A transport over the ranks of this one that pass the same ``color``, ranked by
        ``key``, sharing this transport's ledger (collective: one allgather of every
        rank's color and key, then ``hvd.add_process_set`` for every group, in color
        order, on every rank: Horovod's dynamic process sets, ``HOROVOD_DYNAMIC_PROCESS_SETS=1``
        before ``hvd.init()``).  Horovod ranks a process set's members by their global
        rank, so ``key`` must order them alike (otherwise a ``TransportError``).  Process
        sets are made once per member list and shared."""
        mine = np.array([int(color), int(key)], np.int64)
        everyone = np.asarray(self.allgather(mine.view(np.uint8))).reshape(-1).view(np.int64)
        everyone = everyone.reshape(self.size, 2).tolist()
        ranks_of = self.process_set.ranks if self.process_set.ranks is not None else \
            list(range(self.hvd.size()))
        groups = {}
        for r, (c, k) in enumerate(everyone):
            groups.setdefault(c, []).append((k, ranks_of[r]))
        made = None
        for c in sorted(groups):
            members = [g for _, g in sorted(groups[c])]
            if members != sorted(members):
                raise TransportError("Horovod ranks a process set's members by their global "
                                     f"rank, and this split orders them otherwise ({members})")
            if members == list(range(self.hvd.size())):
                _PROCESS_SETS[tuple(members)] = self.hvd.global_process_set
            if tuple(members) not in _PROCESS_SETS:
                try:
                    _PROCESS_SETS[tuple(members)] = self.hvd.add_process_set(members)
                except (ValueError, RuntimeError) as exc:
                    raise TransportError(
                        f"Horovod cannot add a process set over ranks {members} ({exc}); the "
                        "hierarchical vote makes its process sets after hvd.init(): set "
                        "HOROVOD_DYNAMIC_PROCESS_SETS=1 in the environment of every rank") from exc
            if c == color:
                made = _PROCESS_SETS[tuple(members)]
        out = HorovodTransport(made)
        out.ledger = self.ledger
        return out

    def host_id(self) -> int:
        """Horovod's node index (``hvd.cross_rank()``): the same for exactly the ranks on
        this rank's host."""
        return int(self.hvd.cross_rank())

    # -- buffers: torch tensors as they are; NumPy and CuPy through zero-copy views ----
    def _tensor(self, buf):
        if type(buf).__module__.startswith("torch"):
            return buf.contiguous(), (lambda t: t)
        if is_cupy(buf):
            import cupy
            return self.torch.from_dlpack(buf), cupy.from_dlpack
        return self.torch.from_numpy(np.ascontiguousarray(buf)), (lambda t: t.numpy())

    def _name(self, op, channel, name):
        """Horovod matches async collectives across ranks by name: the caller's, or a
        per-channel counter (every rank starts a channel's calls in the same order)."""
        if name is not None:
            return name
        counts = self.__dict__.setdefault("_counts", {})
        k = counts[channel] = counts.get(channel, 0) + 1
        return f"signcomm.{op}.c{channel}.{k}"

    def _async(self, handle, finish):
        hvd = self.hvd
        return (lambda: finish(hvd.synchronize(handle))), (lambda: bool(hvd.poll(handle)))

    def _start_allgather(self, buf, channel, name):
        t, back = self._tensor(buf)
        h = self.hvd.allgather_async(t.reshape(1, -1), name=self._name("allgather", channel, name),
                                     process_set=self.process_set)
        return self._async(h, back)

    def _start_alltoall(self, buf, channel, name):
        n, m = buf.shape
        t, back = self._tensor(buf)
        splits = self.torch.full((n,), m, dtype=self.torch.int32)
        h = self.hvd.alltoall_async(t.reshape(-1), splits=splits,
                                    name=self._name("alltoall", channel, name),
                                    process_set=self.process_set)

        def finish(out):
            if isinstance(out, tuple):  # (tensor, received_splits)
                out = out[0]
            return back(out.reshape(n, m))

        return self._async(h, finish)

    def _start_allreduce(self, buf, op, channel, name):
        t, back = self._tensor(buf)
        h = self.hvd.allreduce_async(t, op=self._ops[op], name=self._name(f"allreduce_{op}", channel, name),
                                     process_set=self.process_set)
        return self._async(h, back)

    def _broadcast(self, buf, root):
        t, back = self._tensor(buf)
        return back(self.hvd.broadcast(t, root_rank=root, process_set=self.process_set))
