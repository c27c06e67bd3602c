"""The torch.distributed transport: the engine's collectives over process groups, so
that ``torchrun`` jobs (and the DDP hook, ``signcomm.ddp``) need neither MPI nor Horovod.

Collectives (all non-blocking, ``async_op=True``; ``work.is_completed()`` is the test,
``work.wait()`` the finish):

=================  ==========================================================
allgather          ``all_gather_single`` of uint8 (torch 2.13's name; the older
                   ``all_gather_into_tensor`` is deprecated and warns)
alltoall           ``all_to_all_single`` of an (n, m) uint8 buffer, equal splits
allreduce          ``all_reduce`` SUM / MAX / MIN on a copy (the input is left as is)
broadcast          ``broadcast`` (blocking)
=================  ==========================================================

Channels: torch.distributed matches the collectives of one process group by the order
in which each rank starts them.  The engine starts each channel's calls in the same
order on every rank, but not the calls of different channels (a rank may post bucket
2's control before bucket 1's vote, another after), so each channel gets its own
process group, made with ``dist.new_group`` over the same ranks at construction (a
collective call: every rank constructs its transports in the same order) and shared by
the later transports on the same ranks.  The user's
own group (DDP's) is never used for signcomm's traffic, so DDP's calls on it (buffer
broadcasts, the unused-parameter map) never interleave with ours.

Devices: CPU buffers (NumPy, torch CPU) go through a group of the given group's CPU
backend (gloo, unless the group has another CPU backend); CUDA buffers (torch, CuPy)
through an NCCL group when the given group has NCCL, otherwise only their (packed,
small) bytes are staged through host memory.  At construction a few tiny calls probe
that the CPU backend has every collective the engine needs, so a backend without one
fails at once on every rank, saying which backend to use.
"""
from __future__ import annotations


import numpy as np

from ..kernels.xp import is_cupy
from .base import Transport, TransportError

#: Channel groups made so far, per (world, ranks, backend): every transport on the same
#: ranks shares them (new_group is collective and each group holds connections, so a
#: job that builds many optimizers must not make three groups each).  Transports that
#: share groups must not post on one channel at the same time from different places
#: whose order differs across ranks (the same rule as for one transport).
_GROUPS = {}
_PROBED = set()

LAUNCH_HINT = ("launch with `torchrun --nproc-per-node N your_script.py` and call "
               "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (CUDA) first")
NEEDS = ("all_to_all_single (uint8), all_gather_single (uint8) and all_reduce "
         "(SUM on int64, MAX on float64)")
USE = ("use a 'gloo' process group for CPU tensors or 'nccl' for CUDA tensors "
       "(init_process_group('gloo' | 'nccl' | 'cpu:gloo,cuda:nccl'))")


def import_dist():
    """``torch.distributed``, initialised, or a TransportError that says how."""
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover (torch is a dependency)
        raise TransportError(f"the torch transport needs torch.distributed ({exc})") from exc
    if not dist.is_available():
        raise TransportError("this torch build has no torch.distributed; " + LAUNCH_HINT)
    if not dist.is_initialized():
        raise TransportError("torch.distributed is not initialised: " + LAUNCH_HINT)
    return dist


def dist_initialized() -> bool:
    """True when torch.distributed is imported and initialised (never imports torch)."""
    import sys
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:  # noqa: BLE001
        return False


def device_backends(backend: str) -> dict:
    """``dist.get_backend`` text -> {device type: backend name}: "gloo" -> cpu (and
    cuda) gloo, "nccl" -> cuda only, "cpu:gloo,cuda:nccl" as written, another name
    (mpi, ucc, a registered backend) -> that name for cpu and cuda."""
    backend = str(backend).lower()
    if ":" in backend:
        out = {}
        for part in backend.split(","):
            dev, _, name = part.partition(":")
            out[dev.strip()] = name.strip()
        return out
    if backend == "nccl":
        return {"cuda": "nccl"}
    return {"cpu": backend, "cuda": backend}


class TorchDistTransport(Transport):
    """Collectives through torch.distributed on ``process_group`` (default: the world
    group).  ``probe=False`` skips the construction-time check of the collectives."""

    name = "torch"
    background_progress = True   # gloo and NCCL move the data in their own threads

    def __init__(self, process_group=None, *, probe: bool = True):
        super().__init__()
        dist = import_dist()
        import torch
        self.dist, self.torch = dist, torch
        group = process_group if process_group is not None else dist.group.WORLD
        self.group = group
        self._rank = dist.get_rank(group)
        if self._rank < 0:
            raise TransportError("this rank is not a member of the given process group")
        self._size = dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group)
        self.backend = str(dist.get_backend(group))
        devices = device_backends(self.backend)
        self.cpu_backend = devices.get("cpu") or "gloo"
        self.cuda_backend = "nccl" if devices.get("cuda") == "nccl" else None
        if self.cpu_backend == "gloo" and not dist.is_gloo_available():
            raise TransportError("the torch transport needs gloo for CPU buffers (the "
                                 "agreement and shared R), and this torch build has no gloo")
        local = len(ranks) != dist.get_world_size()

        def groups(backend):
            key = (id(dist.group.WORLD), tuple(ranks), backend)
            if key not in _GROUPS:
                try:
                    _GROUPS[key] = [dist.new_group(ranks, backend=backend,
                                                   use_local_synchronization=local)
                                    for _ in range(self.CHANNELS)]
                except (RuntimeError, ValueError) as exc:
                    raise TransportError(f"cannot make {backend!r} process groups over "
                                         f"ranks {ranks} for signcomm's channels ({exc}); "
                                         + USE) from exc
            return key, _GROUPS[key]

        # one group per channel and device kind (see the module docstring)
        cpu_key, self.cpu_groups = groups(self.cpu_backend)
        self.cuda_groups = groups("nccl")[1] if self.cuda_backend else None
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}
        if probe and cpu_key not in _PROBED:
            self._probe()
            _PROBED.add(cpu_key)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def barrier(self):
        self.dist.barrier(group=self.cpu_groups[0])

    # -- sub-groups (the hierarchical vote, ``signcomm.hierarchy``) ----------------------
    def split(self, color: int, key: int, *, tag=None) -> "TorchDistTransport":
        """A transport over the ranks of this one that pass the same ``color``, ranked by
        ``key`` (collective: one allgather of every rank's color and key, then
        ``new_group`` with local synchronisation), sharing this transport's ledger.
        torch.distributed ranks a group's members by their global rank, so ``key`` must
        order them alike (it does for the hierarchical vote's layouts; otherwise a
        ``TransportError``).  Groups are made once per member list and shared."""
        mine = np.array([int(color), int(key)], np.int64)
        everyone = np.asarray(self.allgather(mine.view(np.uint8))).reshape(-1).view(np.int64)
        everyone = everyone.reshape(self._size, 2)
        members = sorted((int(k), r) for r, (c, k) in enumerate(everyone.tolist()) if c == color)
        ranks = [self.dist.get_global_rank(self.group, r) for _, r in members]
        if ranks != sorted(ranks):
            raise TransportError("torch.distributed ranks a group's members by their global "
                                 f"rank, and this split orders them otherwise (ranks {ranks}); "
                                 "launch each machine's ranks in rank order, or use MPI")
        cache = ("split", id(self.dist.group.WORLD), tuple(ranks))
        if cache not in _GROUPS:
            _GROUPS[cache] = self.dist.new_group(
                ranks, use_local_synchronization=len(ranks) != self.dist.get_world_size())
        out = TorchDistTransport(_GROUPS[cache])
        out.ledger = self.ledger
        return out

    def host_id(self) -> int:
        """The lowest global rank on this rank's host, under torchrun (``LOCAL_RANK``,
        ``LOCAL_WORLD_SIZE``: its ranks on a host are contiguous); without them, ranks
        whose host name is the same share a host.  Collective."""
        import os
        import socket
        import zlib
        env = os.environ
        me = self.dist.get_global_rank(self.group, self._rank)
        if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
            return me - int(env["LOCAL_RANK"])
        name = np.array([zlib.crc32(socket.gethostname().encode())], np.int64)
        return int(np.asarray(self.allgather(name.view(np.uint8))).reshape(-1).view(np.int64)
                   .tolist().index(int(name[0])))

    def _probe(self):
        """One tiny call of each collective on every CPU channel group; a backend
        without one raises TransportError on every rank (the failure is local to each
        rank's backend, so all ranks fail alike and nothing waits)."""
        torch, dist, n = self.torch, self.dist, self._size
        for g in self.cpu_groups:
            for what, call in (
                    ("all_to_all_single on uint8",
                     lambda: dist.all_to_all_single(torch.empty((n, 1), dtype=torch.uint8),
                                                    torch.zeros((n, 1), dtype=torch.uint8),
                                                    group=g)),
                    ("all_gather_single on uint8",
                     lambda: dist.all_gather_single(torch.empty(n, dtype=torch.uint8),
                                                    torch.zeros(1, dtype=torch.uint8), group=g)),
                    ("all_reduce MAX on float64",
                     lambda: dist.all_reduce(torch.zeros(1, dtype=torch.float64),
                                             op=dist.ReduceOp.MAX, group=g)),
                    ("all_reduce SUM on int64",
                     lambda: dist.all_reduce(torch.zeros(1, dtype=torch.int64), group=g))):
                try:
                    call()
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                    why = (str(exc).splitlines() or [""])[0]
                    raise TransportError(
                        f"rank {self._rank}: process group backend {self.cpu_backend!r} cannot "
                        f"run {what} ({type(exc).__name__}: {why}); "
                        f"signcomm's torch transport needs {NEEDS}: " + USE) from exc

    # -- buffers: a torch tensor for the backend, and the result in the caller's kind ----
    def _stage(self, buf, channel):
        """(contiguous tensor, its group, back(out) -> the caller's kind)."""
        torch = self.torch
        if type(buf).__module__.startswith("torch"):
            t = buf.contiguous()
            if t.device.type == "cpu":
                return t, self.cpu_groups[channel], (lambda out: out)
            if t.device.type == "cuda" and self.cuda_groups is not None:
                return t, self.cuda_groups[channel], (lambda out: out)
            dev = t.device
            return t.cpu(), self.cpu_groups[channel], (lambda out: out.to(dev))
        if is_cupy(buf):
            import cupy
            t = torch.from_dlpack(buf)
            if self.cuda_groups is not None:
                return t.contiguous(), self.cuda_groups[channel], cupy.from_dlpack
            dev = t.device
            return t.cpu(), self.cpu_groups[channel], \
                (lambda out: cupy.from_dlpack(out.to(dev)))
        a = np.ascontiguousarray(buf)
        return torch.from_numpy(a), self.cpu_groups[channel], (lambda out: out.numpy())

    @staticmethod
    def _post(work, result):
        def finish():
            work.wait()
            return result()

        return finish, work.is_completed

    # -- collectives -----------------------------------------------------------------
    def _start_allgather(self, buf, channel, name):
        t, g, back = self._stage(buf, channel)
        n, m = self._size, t.shape[0]
        out = self.torch.empty(n * m, dtype=t.dtype, device=t.device)
        work = self.dist.all_gather_single(out, t, group=g, async_op=True)
        return self._post(work, lambda: back(out.view(n, m)))

    def _start_alltoall(self, buf, channel, name):
        t, g, back = self._stage(buf, channel)
        out = self.torch.empty_like(t)
        work = self.dist.all_to_all_single(out, t, group=g, async_op=True)
        return self._post(work, lambda: back(out))

    def _start_allreduce(self, buf, op, channel, name):
        t, g, back = self._stage(buf, channel)
        out = t.clone()
        work = self.dist.all_reduce(out, op=self._ops[op], group=g, async_op=True)
        return self._post(work, lambda: back(out))

    def _broadcast(self, buf, root):
        t, g, back = self._stage(buf, 0)
        out = t.clone()
        self.dist.broadcast(out, group=g, group_src=root)
        return back(out)
