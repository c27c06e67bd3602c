"""In-machine exchanges through an MPI-3 shared-memory window (the hierarchical vote).

When every rank of a communicator shares memory (``MPI.COMM_TYPE_SHARED`` holds them
all) an alltoall or allgather inside the machine needs no messages: each rank writes its
send buffer once into its own segment of a window (``MPI.Win.Allocate_shared``), one
barrier says every segment is written, and each rank reads the peers' pieces in place
(``Win.Shared_query``).  MPICH's shared-memory alltoall instead copies every byte twice
through 64 KiB cells, with a handshake per cell that needs the peer scheduled.  A caller
can even write its send buffer straight into its segment (``SharedRows.buffer``): the
hierarchical vote stages its gradients there, so they are copied once in all.

One ``SharedRows`` per (communicator, channel, call name) and size, allocated at its
first use (collective) and reused; it has its own duplicate of the communicator, so its
barriers never meet other calls'.  Each rank's segment has two halves, used in turn
(use t writes half t % 2).  Use t may write its half once the barrier of use t - 1 has
completed on this rank: every rank then has made call t - 1, so (the caller's contract:
rows are read before the next call under the same name) has read the rows of use t - 2,
the last ones in that half.  So one non-blocking barrier per exchange and nothing blocks
in ``start``; a rank that waits tests the requests like any other handle (the stall
detector keeps working).

Memory model (MPI-3.1 section 11.7, example 11.21; valid in the separate and the unified
model): the window is in one passive-target epoch (``Lock_all``); a rank's stores are
followed by ``Win.Sync``, the barrier, and ``Win.Sync`` before the peers' loads, and the
same pattern orders a rank's loads of one use before the peers' stores two uses later:

    write:   [barrier of use t-1 done] sync, store own half t % 2, sync, Ibarrier(t)
    finish:  Ibarrier(t) done -> sync; the rows are views of the peers' halves t % 2
"""
from __future__ import annotations

import atexit
import os

import numpy as np

ENV = "SIGNCOMM_MPI_SHARED_WINDOW"   # "0": always the alltoall/allgather messages

#: per (id(comm), channel, name): the SharedRows (False: could not be allocated); per
#: id(comm): (comm, whether its ranks share memory), decided once, collectively; holding
#: the communicator there keeps its id from being reused
_WINDOWS: dict = {}
_SHARED: dict = {}
_AT_EXIT: list = []


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "", "false", "no", "off")


def shares_memory(MPI, comm) -> bool:
    """Whether every rank of ``comm`` shares memory with every other (all in one
    ``COMM_TYPE_SHARED`` group) and ``SIGNCOMM_MPI_SHARED_WINDOW`` is not 0 on any rank.
    Collective on ``comm`` at its first call; the same answer on every rank."""
    key = id(comm)
    if key not in _SHARED:
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        try:
            same = shared.Get_size() == comm.Get_size()
        finally:
            shared.Free()
        _SHARED[key] = (comm, bool(comm.allreduce(int(same and enabled()), op=MPI.MIN)))
    return _SHARED[key][1]


def window(MPI, comm, channel, name, nbytes):
    """The ``SharedRows`` of (comm, channel, name) with ``nbytes`` per rank (made, or
    remade when the size changed; collective then), or None when the window cannot be
    allocated on some rank (the same answer on every rank; later calls give None too)."""
    key = (id(comm), channel, name)
    win = _WINDOWS.get(key)
    if win is False:
        return None
    if win is not None and win.nbytes == nbytes:
        return win
    if win is not None:
        win.free()
    try:
        win = SharedRows(MPI, comm, nbytes)
        ok = 1
    except MPI.Exception:
        win, ok = None, 0
    if not comm.allreduce(ok, op=MPI.MIN):
        # A rank could not allocate: all use messages.  A window that some ranks did
        # get is left to MPI_Finalize (freeing it is collective over ranks lacking it).
        _WINDOWS[key] = False
        return None
    if not _AT_EXIT:
        _AT_EXIT.append(atexit.register(free_all))  # after mpi4py's: runs before Finalize
    _WINDOWS[key] = win
    return win


def existing(comm, channel, name, nbytes):
    """The ``SharedRows`` that ``window`` made for these arguments, or None (local)."""
    win = _WINDOWS.get((id(comm), channel, name))
    return win if win and win.nbytes == nbytes else None


def free_all():
    """Free every window, in the order they were made (the same on every rank): MPI
    must not finalize with windows open (MPICH's OFI netmod then fails to close)."""
    from mpi4py import MPI
    if MPI.Is_finalized():
        return
    for key, win in list(_WINDOWS.items()):
        if win:
            win.free()
        del _WINDOWS[key]


class SharedRows:
    """A window of two halves of ``nbytes`` per rank on (a duplicate of) ``comm`` (see
    the module docstring)."""

    def __init__(self, MPI, comm, nbytes):
        self.MPI, self.nbytes = MPI, int(nbytes)
        self.comm = comm.Dup()
        self.win = MPI.Win.Allocate_shared(2 * self.nbytes, 1, comm=self.comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.segments = [np.frombuffer(self.win.Shared_query(j)[0], np.uint8)
                         for j in range(comm.Get_size())]
        sizes = [seg.shape[0] for seg in self.segments]
        if any(size < 2 * self.nbytes for size in sizes):  # every rank sees these sizes
            self.free()
            raise ValueError(f"ranks exchange buffers of different sizes ({sizes} bytes by "
                             "local rank); every rank must pass the same shape")
        self.uses, self.last = 0, None   # last: the barrier of the last use (or None)
        self.mine = self.segments[self.comm.Get_rank()]

    def half(self, seg, use):
        h = use % 2
        return seg[h * self.nbytes:(h + 1) * self.nbytes]

    def buffer(self):
        """This rank's half for the next use, to fill and pass to the next ``post``
        without a copy, or None when it cannot be written yet (fill a buffer of your own).
        Asked again before that ``post``, the same half."""
        if self.last is not None and not self.last.test():
            return None
        self.win.Sync()   # the peers' loads of the use before, before these stores
        return self.half(self.mine, self.uses)

    def post(self, src, pick):
        """Write ``src`` (``nbytes`` of uint8, NumPy; no copy when it is ``buffer()``)
        into this rank's next half as soon as that may be written; (finish, test) as
        ``Transport._start_*`` returns: ``finish()`` gives ``[pick(half of rank j)]``."""
        use = _Use(self, src, pick, self.uses, self.last)
        self.uses += 1
        self.last = use
        return use.finish, use.test

    def free(self):
        """Free the window (collective; every rank is past its last reading: it is here)."""
        self.comm.Barrier()
        self.win.Unlock_all()
        self.win.Free()
        self.comm.Free()


class _Use:
    """One exchange: its write waits for the barrier of the use before (``previous``)."""

    def __init__(self, rows, src, pick, use, previous):
        self.rows, self.src, self.pick, self.use = rows, src, pick, use
        self.previous, self.written = previous, None

    def _write(self):
        rows = self.rows
        mine = rows.half(rows.mine, self.use)
        rows.win.Sync()
        if self.src.ctypes.data != mine.ctypes.data:
            np.copyto(mine, self.src.reshape(-1))
        rows.win.Sync()                    # the stores, before the barrier says so
        self.written = rows.comm.Ibarrier()
        self.previous = self.src = None

    def test(self):
        if self.written is None:
            if self.previous is not None and not self.previous.test():
                return False
            self._write()
        return bool(self.written.Test())

    def complete(self):
        if self.written is None:
            if self.previous is not None:
                self.previous.complete()
            self._write()
        self.written.Wait()

    def finish(self):
        self.complete()
        self.rows.win.Sync()               # the peers' stores, before this rank's loads
        return [self.pick(self.rows.half(seg, self.use)) for seg in self.rows.segments]
