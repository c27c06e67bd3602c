"""The MPI transport: mpi4py on any communicator; Horovod is never imported."""
from __future__ import annotations

import os
import sys

import numpy as np

from ..kernels.xp import is_cupy
from . import shm
from .base import Transport, TransportError, _is_uint8

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
    """Collectives through mpi4py on ``comm`` (default ``MPI.COMM_WORLD``), non-blocking
    (``Iallgather``/``Ialltoall``/``Iallreduce``; messages above ``max_message_bytes``
    are split into several).  Each channel is its own duplicate of ``comm``.

    Buffers: NumPy; torch CPU tensors (zero-copy views); torch CUDA tensors and CuPy
    arrays go straight to MPI when the library reports CUDA support (or
    ``SIGNCOMM_MPI_CUDA_AWARE=1``), otherwise only these (packed, small) bytes are
    staged through pinned host memory.  ``abort_on_error`` installs
    ``install_abort_on_error``."""

    name = "mpi"

    def __init__(self, comm=None, *, abort_on_error: bool = True,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, channels=None):
        super().__init__()
        MPI = import_mpi()
        self.MPI = MPI
        if not MPI.Is_initialized():
            MPI.Init()  # normally done by importing mpi4py.MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        # ``channels``: the per-channel communicators, made by ``split``
        self.comms = list(channels) if channels is not None else \
            _channel_comms(self.comm, self.CHANNELS)
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

    # -- sub-groups (the hierarchical vote, ``signcomm.hierarchy``) ----------------------
    def split(self, color: int, key: int, *, tag=None) -> "MPITransport":
        """A transport over the ranks of this one that pass the same ``color``, ranked by
        ``key`` (``Comm.Split``; collective: every rank calls it, in the same order).  It
        shares this transport's ledger.  On ``COMM_WORLD``, a ``tag`` that names the whole
        grouping (the same on every rank) makes the communicators once per (tag, color,
        key) and shares them with later transports, so a job that builds many optimizers
        does not use up MPI's communicator ids."""
        world = self.MPI.Comm.Compare(self.comm, self.MPI.COMM_WORLD) == self.MPI.IDENT
        cache = ("split", tag, int(color), int(key)) if world and tag is not None else None
        if cache is not None and cache in _CHANNELS:
            comms = _CHANNELS[cache]
        else:
            sub = self.comm.Split(int(color), int(key))
            comms = [sub] + [sub.Dup() for _ in range(self.CHANNELS - 1)]
            if cache is not None:
                _CHANNELS[cache] = comms
        out = MPITransport(comms[0], abort_on_error=False,
                           max_message_bytes=self.max_message_bytes, channels=comms)
        out.ledger = self.ledger
        return out

    def host_id(self) -> int:
        """The lowest rank (of this transport) on this rank's host: ranks that can share
        memory (``MPI.COMM_TYPE_SHARED``) get the same id.  Collective."""
        world = self.MPI.Comm.Compare(self.comm, self.MPI.COMM_WORLD) == self.MPI.IDENT
        if world and "host_id" in _CHANNELS:
            return _CHANNELS["host_id"]
        shared = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            hid = int(shared.allreduce(self.rank, op=self.MPI.MIN))
        finally:
            shared.Free()
        if world:
            _CHANNELS["host_id"] = hid
        return hid

    # -- in-machine exchanges through a shared-memory window (``signcomm.comm.shm``) ----
    def start_alltoall_rows(self, buf, *, channel=0, name=None):
        """``Transport.start_alltoall_rows``: when every rank of this transport shares
        memory, row j is read in place from rank j's segment of a shared-memory window
        (ledger op "alltoall_shm"); otherwise ``start_alltoall``."""
        win = self._window(buf, channel, name) if self._hosted(buf, 2) else None
        if win is None:
            return super().start_alltoall_rows(buf, channel=channel, name=name)
        n, m, i = self.size, buf.shape[1], self.rank
        return self._shared(win, buf, "alltoall_shm", (n - 1) * m,
                            lambda seg: seg[i * m:(i + 1) * m], name)

    def start_allgather_rows(self, buf, *, channel=0, name=None):
        """``Transport.start_allgather_rows``, as ``start_alltoall_rows`` (ledger op
        "allgather_shm")."""
        win = self._window(buf, channel, name) if self._hosted(buf, 1) else None
        if win is None:
            return super().start_allgather_rows(buf, channel=channel, name=name)
        m = buf.shape[0]
        return self._shared(win, buf, "allgather_shm", (self.size - 1) * m, lambda seg: seg,
                            name)

    def rows_buffer(self, shape, *, channel=0, name=None):
        """``Transport.rows_buffer``: this rank's own part of the shared-memory window
        (uint8 NumPy) that an earlier ``start_*_rows`` call under ``name`` made for this
        size, else None (never collective: ranks may ask or not)."""
        if name is None or len(shape) not in (1, 2) or \
                (len(shape) == 2 and shape[0] != self.size):
            return None
        win = shm.existing(self.comms[channel], channel, name, int(np.prod(shape)))
        buf = None if win is None else win.buffer()
        return None if buf is None else buf.reshape(shape)

    def _hosted(self, buf, ndim):
        """Whether ``buf`` may go through a window: uint8 of ``ndim`` dimensions (an
        alltoall's rows one per rank) in host memory, on more than one rank."""
        return self.size > 1 and len(buf.shape) == ndim and _is_uint8(buf) \
            and (ndim == 1 or buf.shape[0] == self.size) \
            and (isinstance(buf, np.ndarray) or (_is_torch(buf) and buf.device.type == "cpu"))

    def _window(self, buf, channel, name):
        """The window of this call, or None for messages: no ``name``, ranks that do not
        all share memory (or ``SIGNCOMM_MPI_SHARED_WINDOW=0``), or a window that could not
        be allocated.  Every rank decides alike (collective the first time)."""
        nbytes = int(np.prod(buf.shape))
        if name is None or not nbytes:
            return None
        comm = self.comms[channel]
        if not shm.shares_memory(self.MPI, comm):
            return None
        return shm.window(self.MPI, comm, channel, name, nbytes)

    def _shared(self, win, buf, op, nbytes, pick, name):
        a, _, back = self._stage(buf)

        def post():
            finish, test = win.post(a, pick)
            return (lambda: [back(row) for row in finish()]), test

        return self._handle(op, nbytes, nbytes, post, name)

    # -- buffers: what MPI reads and writes, and the result in the caller's kind -------
    def _stage(self, buf):
        """(contiguous array MPI can use, empty(shape, like) for outputs, back(out))."""
        if _is_torch(buf):
            import torch
            t = buf.contiguous()
            if t.device.type == "cpu":
                return t.numpy(), _np_empty, torch.from_numpy
            if self.cuda_aware:
                torch.cuda.current_stream(t.device).synchronize()  # the bytes are written
                return t, lambda shape, a: torch.empty(shape, dtype=a.dtype, device=a.device), \
                    lambda out: out
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t)
            return host.numpy(), _np_empty, \
                lambda out: torch.from_numpy(out).to(t.device, non_blocking=True)
        if is_cupy(buf):
            if self.cuda_aware:
                import cupy
                cupy.cuda.get_current_stream().synchronize()
                return buf, lambda shape, a: cupy.empty(shape, a.dtype), lambda out: out
            import cupy
            return buf.get(), _np_empty, cupy.asarray
        return np.ascontiguousarray(buf), _np_empty, lambda out: out

    def _post(self, parts, finish):
        """(finish, test) of a list of MPI requests; ``finish`` runs after all completed."""
        MPI = self.MPI

        def wait():
            MPI.Request.Waitall(parts)
            return finish()

        return wait, (lambda: bool(MPI.Request.Testall(parts)))

    # -- collectives, split into messages of at most max_message_bytes -----------------
    def _start_allgather(self, buf, channel, name):
        a, empty, back = self._stage(buf)
        comm = self.comms[channel]
        n, m = self.size, a.shape[0]
        out = empty((n, m), a)
        step = max(1, self.max_message_bytes)
        if m <= step:
            return self._post([comm.Iallgather(a, out)], lambda: back(out))
        reqs, pieces = [], []
        for lo in range(0, m, step):
            hi = min(lo + step, m)
            part = empty((n, hi - lo), a)
            reqs.append(comm.Iallgather(a[lo:hi], part))
            pieces.append((lo, hi, part))
        return self._post(reqs, lambda: back(_assemble(out, pieces)))

    def _start_alltoall(self, buf, channel, name):
        a, empty, back = self._stage(buf)
        comm = self.comms[channel]
        n, m = a.shape
        out = empty((n, m), a)
        step = max(1, self.max_message_bytes // max(n, 1))
        if m <= step:
            return self._post([comm.Ialltoall(a, out)], lambda: back(out))
        reqs, pieces = [], []
        for lo in range(0, m, step):
            hi = min(lo + step, m)
            part = empty((n, hi - lo), a)
            send = a[:, lo:hi]
            send = send.contiguous() if _is_torch(send) else np.ascontiguousarray(send)
            reqs.append(comm.Ialltoall(send, part))
            pieces.append((lo, hi, part, send))
        return self._post(reqs, lambda: back(_assemble(out, [p[:3] for p in pieces])))

    def _start_allreduce(self, buf, op, channel, name):
        a, empty, back = self._stage(buf)
        comm = self.comms[channel]
        out = empty(a.shape, a)
        step = max(1, self.max_message_bytes // max(a.itemsize if hasattr(a, "itemsize")
                                                    else a.element_size(), 1))
        reqs = [comm.Iallreduce(a[lo:lo + step], out[lo:lo + step], op=self._ops[op])
                for lo in range(0, max(a.shape[0], 1), step)]
        return self._post(reqs, lambda: back(out))

    def _broadcast(self, buf, root):
        a, _, back = self._stage(buf)
        out = a.clone() if _is_torch(a) else np.array(a, copy=True, order="C")
        flat = out.reshape(-1).view(np.uint8) if not _is_torch(out) else out.reshape(-1)
        step = max(1, self.max_message_bytes)
        for lo in range(0, max(flat.shape[0], 1), step):
            self.comm.Bcast(flat[lo:lo + step], root=root)
        return back(out)


_CHANNELS = {}


def _channel_comms(comm, channels):
    """``comm`` and ``channels - 1`` duplicates of it, one per channel, so independent
    streams of non-blocking collectives never have to be started in one global order.
    For ``COMM_WORLD`` (the default) they are made once and shared by every transport
    (``Dup`` is collective, and MPI has a few thousand communicator ids: a job that builds
    many optimizers must not use them up); other communicators get their own."""
    from mpi4py import MPI
    if MPI.Comm.Compare(comm, MPI.COMM_WORLD) != MPI.IDENT:
        return [comm] + [comm.Dup() for _ in range(channels - 1)]
    if "world" not in _CHANNELS:
        _CHANNELS["world"] = [comm] + [comm.Dup() for _ in range(channels - 1)]
    return _CHANNELS["world"]


def _np_empty(shape, like):
    return np.empty(shape, like.dtype)


def _assemble(out, pieces):
    for lo, hi, part in pieces:
        out[:, lo:hi] = part
    return out


def _is_torch(buf) -> bool:
    return type(buf).__module__.startswith("torch")


def _mpi_cuda_aware(MPI) -> bool:
    env = os.environ.get("SIGNCOMM_MPI_CUDA_AWARE")
    if env is not None:
        return env not in ("0", "", "false", "no")
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query else False
    except Exception:  # the library lacks MPIX_Query_cuda_support
        return False
