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


class HorovodTransport(Transport):
    """Collectives through Horovod on ``process_set`` (default: all ranks)."""

    name = "horovod"

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

    def _tensor(self, buf):
        if is_cupy(buf):
            return self.torch.from_dlpack(buf)
        return self.torch.from_numpy(np.ascontiguousarray(buf))

    @staticmethod
    def _array(t, like):
        if is_cupy(like):
            import cupy
            return cupy.from_dlpack(t)
        return t.numpy()

    def _allgather(self, buf):
        t = self._tensor(buf).reshape(1, -1)
        return self._array(self.hvd.allgather(t, process_set=self.process_set), buf)

    def _alltoall(self, buf):
        n, m = buf.shape
        t = self._tensor(buf).reshape(-1)
        splits = self.torch.full((n,), m, dtype=self.torch.int32)
        out = self.hvd.alltoall(t, splits=splits, process_set=self.process_set)
        if isinstance(out, tuple):  # (tensor, received_splits)
            out = out[0]
        return self._array(out.reshape(n, m), buf)

    def _allreduce(self, buf, op):
        t = self._tensor(buf)
        out = self.hvd.allreduce(t, op=self._ops[op], process_set=self.process_set)
        return self._array(out, buf)

    def _broadcast(self, buf, root):
        t = self._tensor(buf)
        return self._array(self.hvd.broadcast(t, root_rank=root, process_set=self.process_set), buf)
