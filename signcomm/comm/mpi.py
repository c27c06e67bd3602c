"""The MPI transport: mpi4py on any communicator; Horovod is never imported."""
from __future__ import annotations

import os
import sys

import numpy as np

from ..kernels.xp import is_cupy
from .base import Transport, TransportError

#: Largest message handed to one MPI call; bigger buffers are split into several calls,
#: so counts of 2**31 elements and more work with any MPI (the int count limit).
MAX_MESSAGE_BYTES = 1 << 30

LAUNCH_HINT = ("launch with `mpirun -np N python your_script.py` (a plain `python` run is a "
               "1-rank job); install MPI with `pip install mpich mpi4py` or `make setup`")


def import_mpi():
    """``mpi4py.MPI``, or a TransportError that says how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise TransportError(f"the MPI transport needs mpi4py, which does not import ({exc}); "
                             + LAUNCH_HINT) from exc
    return MPI


def install_abort_on_error(comm):
    """Make an uncaught exception on this rank abort the whole MPI job (MPI_Abort), so
    the other ranks stop within seconds instead of waiting forever in a collective."""
    if comm.Get_size() <= 1 or getattr(sys.excepthook, "_signcomm_abort", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stderr.write(f"signcomm: uncaught {exc_type.__name__} on rank {comm.Get_rank()}; "
                         "aborting the MPI job\n")
        sys.stderr.flush()
        comm.Abort(1)

    hook._signcomm_abort = True
    sys.excepthook = hook


class MPITransport(Transport):
    """Collectives through mpi4py on ``comm`` (default ``MPI.COMM_WORLD``).

    CuPy buffers go straight to MPI when the library reports CUDA support (or
    ``SIGNCOMM_MPI_CUDA_AWARE=1``); otherwise only the (packed, small) bytes are staged
    through host memory.  ``abort_on_error`` installs ``install_abort_on_error``."""

    name = "mpi"

    def __init__(self, comm=None, *, abort_on_error: bool = True,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        super().__init__()
        MPI = import_mpi()
        self.MPI = MPI
        if not MPI.Is_initialized():
            MPI.Init()  # normally done by importing mpi4py.MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.max_message_bytes = int(max_message_bytes)
        self.cuda_aware = _mpi_cuda_aware(MPI)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        if abort_on_error:
            install_abort_on_error(self.comm)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def barrier(self):
        self.comm.Barrier()

    # -- staging of GPU buffers -----------------------------------------------------
    def _host(self, buf):
        if is_cupy(buf) and not self.cuda_aware:
            return buf.get(), True
        return buf, False

    @staticmethod
    def _back(out, staged):
        if staged:
            import cupy
            return cupy.asarray(out)
        return out

    def _empty(self, like, shape, dtype=None):
        if is_cupy(like):
            import cupy
            return cupy.empty(shape, dtype or like.dtype)
        return np.empty(shape, dtype or like.dtype)

    # -- collectives, split into messages of at most max_message_bytes -----------------
    def _allgather(self, buf):
        buf, staged = self._host(np.ascontiguousarray(buf) if not is_cupy(buf) else buf)
        n, m = self.size, buf.shape[0]
        out = self._empty(buf, (n, m))
        step = max(1, self.max_message_bytes)
        if m <= step:
            self.comm.Allgather(buf, out)
        else:
            tmp = self._empty(buf, (n, step))
            for a in range(0, m, step):
                b = min(a + step, m)
                part = tmp[:, : b - a] if b - a == step else self._empty(buf, (n, b - a))
                self.comm.Allgather(np.ascontiguousarray(buf[a:b]), part)
                out[:, a:b] = part
        return self._back(out, staged)

    def _alltoall(self, buf):
        buf, staged = self._host(buf)
        n, m = buf.shape
        out = self._empty(buf, (n, m))
        step = max(1, self.max_message_bytes // max(n, 1))
        if m <= step:
            self.comm.Alltoall(np.ascontiguousarray(buf), out)
        else:
            for a in range(0, m, step):
                b = min(a + step, m)
                part = self._empty(buf, (n, b - a))
                self.comm.Alltoall(np.ascontiguousarray(buf[:, a:b]), part)
                out[:, a:b] = part
        return self._back(out, staged)

    def _allreduce(self, buf, op):
        buf, staged = self._host(buf)
        buf = np.ascontiguousarray(buf)
        out = np.empty_like(buf)
        step = max(1, self.max_message_bytes // max(buf.itemsize, 1))
        for a in range(0, max(buf.shape[0], 1), step):
            b = min(a + step, buf.shape[0])
            self.comm.Allreduce(buf[a:b], out[a:b], op=self._ops[op])
        return self._back(out, staged)

    def _broadcast(self, buf, root):
        buf, staged = self._host(buf)
        out = np.array(buf, copy=True, order="C")
        flat = out.reshape(-1).view(np.uint8)
        step = max(1, self.max_message_bytes)
        for a in range(0, max(flat.shape[0], 1), step):
            self.comm.Bcast(flat[a:a + step], root=root)
        return self._back(out, staged)


def _mpi_cuda_aware(MPI) -> bool:
    env = os.environ.get("SIGNCOMM_MPI_CUDA_AWARE")
    if env is not None:
        return env not in ("0", "", "false", "no")
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query else False
    except Exception:  # the library lacks MPIX_Query_cuda_support
        return False
