"""The transport interface: the few collectives the vote schedules need."""
from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np

from .ledger import Ledger, ring_allreduce_bytes, timed


class TransportError(RuntimeError):
    """A transport cannot be used as asked (not installed, not initialised, ...)."""


class RankMismatchError(ValueError):
    """Ranks disagree on what they are about to exchange (raised on every rank)."""


class RemoteRankError(RuntimeError):
    """Another rank reported an error for this call (raised on every rank)."""


class StallError(RuntimeError):
    """A collective waited longer than ``SIGNCOMM_STALL_SECONDS`` (raised on the waiting
    rank; uncaught, it ends the MPI job)."""


OPS = ("sum", "max", "min")
STALL_SECONDS = 300.0       # default: end the job after a collective waited this long
STALL_WARN_SECONDS = 60.0   # default: warn once after this long


def stall_limits():
    """(warn, end) seconds from ``SIGNCOMM_STALL_WARN_SECONDS`` and
    ``SIGNCOMM_STALL_SECONDS`` (0 disables either)."""
    def read(name, default):
        try:
            return max(0.0, float(os.environ.get(name, default)))
        except ValueError:
            return default
    end = read("SIGNCOMM_STALL_SECONDS", STALL_SECONDS)
    warn = read("SIGNCOMM_STALL_WARN_SECONDS", min(STALL_WARN_SECONDS, end / 2 if end else STALL_WARN_SECONDS))
    return warn, end


class Handle:
    """A posted collective.  ``test()`` says, without blocking, whether it has finished;
    ``wait()`` blocks until it has and returns its result (the same object on every
    later call).  The ledger records the call when it finishes, with the time spent
    inside the transport (posting and waiting), not the time it ran in the background."""

    def __init__(self, transport, op, sent, received, finish, test=None, seconds=0.0,
                 name=None):
        self._transport, self._op, self._name = transport, op, name
        self._sent, self._received = sent, received
        self._finish, self._test = finish, test
        self._kind = transport.ledger._kind
        self._seconds = seconds
        self._done, self._result = False, None

    @property
    def done(self) -> bool:
        return self._done

    def test(self) -> bool:
        if self._done:
            return True
        if self._test is None:
            return False
        with timed() as t:
            ready = self._test()
        self._seconds += t.seconds
        return ready

    def wait(self):
        if not self._done:
            with timed() as t:
                if self._test is not None:
                    self._poll()
                self._result = self._finish()
            self._done = True
            self._transport.ledger.record(self._op, self._sent, self._received,
                                          self._seconds + t.seconds, kind=self._kind)
            self._finish = self._test = None
        return self._result


    def _poll(self):
        """The stall detector: test until done (a blocking wait spins the same way), and
        if the other ranks never come (a rank left the training loop, crashed, stepped
        fewer times, or built other buckets), warn once, then raise ``StallError``."""
        warn, end = stall_limits()
        if not (warn or end):
            return  # no detector: the transport's own blocking wait
        t0, k, warned = time.perf_counter(), 0, False
        background = self._transport.background_progress
        pause = 2e-5
        while not self._test():
            k += 1
            if background:  # the data moves in other threads: leave them the core
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
            elif k < 64:
                continue
            waited = time.perf_counter() - t0
            if waited > 1.0:
                time.sleep(1e-3)  # a wait this long is rarely a transfer: leave the core
            if warn and not warned and waited > warn:
                warned = True
                sys.stderr.write(f"signcomm: rank {self._transport.rank} has waited {waited:.0f} s "
                                 f"in {self._describe()}; {_STALL_HINT}\n")
                sys.stderr.flush()
            if end and waited > end:
                raise StallError(f"signcomm: rank {self._transport.rank} waited {waited:.0f} s in "
                                 f"{self._describe()} and gives up (SIGNCOMM_STALL_SECONDS="
                                 f"{end:g}): {_STALL_HINT}")

    def _describe(self):
        step = self._transport.ledger.step
        name = f" ({self._name})" if self._name else ""
        return f"{self._op}{name} of step {step}" if step is not None else f"{self._op}{name}"


_STALL_HINT = ("usually another rank stopped stepping (it left the training loop, exited or "
               "crashed, or called step() fewer times) or the ranks' models or bucket "
               "layouts differ")


class Transport:
    """Rank, size and the collectives the vote needs, on 1-D/2-D NumPy, CuPy or torch
    buffers (the result has the input's kind and device).

    Every collective exists non-blocking, ``start_allgather`` / ``start_alltoall`` /
    ``start_allreduce`` returning a ``Handle``, and blocking (``allgather`` = start and
    wait).  ``channel`` (0, 1, 2) keeps independent streams of collectives apart: calls
    on one channel must be started in the same order on every rank, calls on different
    channels need not be (MPI: one duplicated communicator per channel; Horovod matches
    by name).  Subclasses implement ``_start_*`` (or only the blocking ``_*``, which the
    default ``_start_*`` wraps).  ``agree`` is the consistency check that turns a
    mismatch or a local failure into an error on every rank instead of a hang."""

    name = "abstract"
    CHANNELS = 3
    #: True when collectives progress in threads of their own (Horovod, gloo, NCCL): a
    #: waiter then sleeps between tests; False (MPI) when they progress inside the calls
    #: that test them, so a waiter tests without pause, as a blocking wait would.
    background_progress = False

    def __init__(self):
        self.ledger = Ledger()

    # -- identity -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError

    # -- non-blocking collectives ---------------------------------------------------
    def start_allgather(self, buf, *, channel: int = 0, name: str | None = None) -> Handle:
        """(m,) uint8 on every rank -> (n, m): row r is rank r's buffer."""
        if len(buf.shape) != 1 or not _is_uint8(buf):
            raise TypeError(f"allgather takes a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
        n, m = self.size, buf.shape[0]
        return self._handle("allgather", (n - 1) * m, (n - 1) * m,
                            lambda: self._start_allgather(buf, channel, name), name)

    def start_alltoall(self, buf, *, channel: int = 0, name: str | None = None) -> Handle:
        """(n, m) uint8: row j goes to rank j -> (n, m): row j came from rank j."""
        n = self.size
        if len(buf.shape) != 2 or buf.shape[0] != n or not _is_uint8(buf):
            raise TypeError(f"alltoall takes an (n={n}, m) uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
        m = buf.shape[1]
        return self._handle("alltoall", (n - 1) * m, (n - 1) * m,
                            lambda: self._start_alltoall(buf, channel, name), name)

    def start_allreduce(self, buf, op: str = "sum", *, channel: int = 0,
                        name: str | None = None) -> Handle:
        """Elementwise reduction of a 1-D numeric buffer over ranks (a new array)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if len(buf.shape) != 1:
            raise TypeError(f"allreduce takes a 1-D buffer, got shape {tuple(buf.shape)}")
        b = ring_allreduce_bytes(_nbytes(buf), self.size)
        return self._handle(f"allreduce_{op}", b, b,
                            lambda: self._start_allreduce(buf, op, channel, name), name)

    def _handle(self, op, sent, received, post, name=None):
        with timed() as t:
            finish, test = post()
        return Handle(self, op, sent, received, finish, test, t.seconds, name)

    # -- in-machine exchanges (the hierarchical vote) ---------------------------------
    def start_alltoall_rows(self, buf, *, channel: int = 0, name: str | None = None) -> Handle:
        """``start_alltoall`` whose result is a sequence of n rows (row j came from rank
        j) that may be views of memory the ranks share, not to be written: this rank must
        be done reading them before its next ``*_rows`` call under the same ``name``.
        Here: ``start_alltoall``; the MPI transport reads the rows in place from a
        shared-memory window when its ranks share a host (``signcomm.comm.shm``)."""
        return self.start_alltoall(buf, channel=channel, name=name)

    def start_allgather_rows(self, buf, *, channel: int = 0, name: str | None = None) -> Handle:
        """``start_allgather`` with the result as ``start_alltoall_rows`` gives it."""
        return self.start_allgather(buf, channel=channel, name=name)

    def rows_buffer(self, shape, *, channel: int = 0, name: str | None = None):
        """A uint8 buffer of ``shape`` (host memory) to fill and pass as ``buf`` to the
        next ``start_*_rows`` call under ``name``, which then takes it without a copy (the
        MPI transport's shared-memory window: this rank's own part of it); asked again
        before that call, the same buffer.  None when there is no such buffer (here)."""
        return None

    # -- blocking collectives -------------------------------------------------------
    def allgather(self, buf):
        return self.start_allgather(buf).wait()

    def alltoall(self, buf):
        return self.start_alltoall(buf).wait()

    def allreduce(self, buf, op: str = "sum"):
        return self.start_allreduce(buf, op).wait()

    def broadcast(self, buf, root: int = 0):
        """Rank ``root``'s 1-D buffer on every rank (a new array)."""
        n = self.size
        with timed() as t:
            out = self._broadcast(buf, root)
        sent = (n - 1) * _nbytes(buf) if self.rank == root else 0
        received = 0 if self.rank == root else _nbytes(buf)
        self.ledger.record("broadcast", sent, received, t.seconds)
        return out

    # -- consistency -----------------------------------------------------------------
    def agree(self, signature, error: str | None = None, what: str = "this call"):
        """Check that every rank passes the same ``signature`` (a tuple of ints, strings
        or arrays) and that no rank has an ``error``; one small MAX-allreduce.  Raises
        ``RankMismatchError`` / ``RemoteRankError`` on every rank otherwise."""
        self.start_agree(signature, error, what).wait()

    def start_agree(self, signature, error: str | None = None, what: str = "this call",
                    values=None, *, channel: int = 0, name: str | None = None) -> "Agreement":
        """Non-blocking ``agree``, optionally carrying ``values`` (float64, >= 0, one
        MAX-allreduce with the check): ``wait()`` raises as ``agree`` does, or returns
        the elementwise max of ``values`` over ranks."""
        return Agreement(self, signature, error, what, values, channel, name)

    # -- sub-groups (the hierarchical vote) ---------------------------------------------
    def split(self, color: int, key: int, *, tag=None) -> "Transport":
        """A transport over the ranks that pass the same ``color``, ranked by ``key``
        (collective), sharing this transport's ledger.  MPI, torch.distributed and Horovod
        have it."""
        raise TransportError(f"the {self.name} transport cannot make sub-groups yet, so the "
                             "hierarchical vote (hierarchy= / ranks_per_node=) needs the MPI "
                             "transport (transport='mpi', under mpirun) or torch.distributed "
                             "(transport='torch')")

    def host_id(self) -> int:
        """An id shared by exactly the ranks on this rank's host (collective)."""
        return self.split(0, 0).host_id()  # raises the clear error above

    # -- engine hooks: the default posts a blocking call -------------------------------
    def _start_allgather(self, buf, channel, name):
        out = self._allgather(buf)
        return (lambda: out), (lambda: True)

    def _start_alltoall(self, buf, channel, name):
        out = self._alltoall(buf)
        return (lambda: out), (lambda: True)

    def _start_allreduce(self, buf, op, channel, name):
        out = self._allreduce(buf, op)
        return (lambda: out), (lambda: True)

    def _allgather(self, buf):
        raise NotImplementedError

    def _alltoall(self, buf):
        raise NotImplementedError

    def _allreduce(self, buf, op):
        raise NotImplementedError

    def _broadcast(self, buf, root):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError


class Agreement:
    """One posted agreement: signature words, their negation, the failed rank and the
    carried values in one float64 MAX-allreduce (signature words are < 2**32, exact)."""

    def __init__(self, transport, signature, error, what, values, channel, name):
        sig = _signature_words(signature).astype(np.float64)
        vals = np.zeros(0) if values is None else np.ascontiguousarray(values, np.float64)
        failed = float(transport.rank + 1) if error else 0.0
        words = np.concatenate([sig, -sig, [failed], vals])
        self.transport, self.signature, self.error, self.what = transport, signature, error, what
        self.k, self.nvals = sig.shape[0], vals.shape[0]
        with transport.ledger.kind("control"):
            self.handle = transport.start_allreduce(words, "max", channel=channel, name=name)
        self._checked = False

    def test(self) -> bool:
        return self.handle.test()

    def wait(self):
        top = np.asarray(self.handle.wait())
        k = self.k
        if not self._checked:
            bad_rank = int(top[2 * k]) - 1
            if bad_rank >= 0:
                if self.error:
                    raise RemoteRankError(f"rank {self.transport.rank}: {self.error}")
                raise RemoteRankError(f"rank {bad_rank} failed in {self.what} (its own error "
                                      f"says why); stopping rank {self.transport.rank} too")
            if not np.array_equal(top[:k], -top[k:2 * k]):
                differ = top[:k] != -top[k:2 * k]
                if isinstance(self.signature, dict):
                    names = [key for key in self.signature if differ[SIG_HEAD + _slot(key)]]
                    mine = ", ".join(f"{key}={_short(self.signature[key])}" for key in names) \
                        or repr(self.signature)
                    raise RankMismatchError(
                        f"ranks disagree on {self.what}: {', '.join(names) or 'the settings'} "
                        f"differ{'s' if len(names) == 1 else ''} across ranks (rank "
                        f"{self.transport.rank} has {mine})")
                raise RankMismatchError(
                    f"ranks disagree on {self.what}: rank {self.transport.rank} has "
                    f"{self.signature!r}; another rank passed a different size, dtype, "
                    "layout or setting")
            self._checked = True
        return top[2 * k + 1:]


def _is_uint8(buf) -> bool:
    return str(buf.dtype) in ("uint8", "torch.uint8")


def _nbytes(buf) -> int:
    if hasattr(buf, "nbytes"):
        return int(buf.nbytes)
    return int(buf.numel() * buf.element_size())  # torch


SIG_HEAD = 5    # words: the length and a 128-bit digest of the whole signature
SIG_SLOTS = 16  # words: per-field digests (a dict signature), to name what differs


def _digest(items, size):
    digest = hashlib.blake2b(digest_size=size)
    for item in items:
        if isinstance(item, np.ndarray):
            data = repr((item.dtype.str, item.shape)).encode() + np.ascontiguousarray(item).tobytes()
        else:
            data = repr(item).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return np.frombuffer(digest.digest(), dtype=np.uint32).astype(np.int64)


def _slot(key) -> int:
    return int(_digest([key], 4)[0]) % SIG_SLOTS


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _signature_words(signature) -> np.ndarray:
    """A signature as a fixed number of int64 words: its length, a 128-bit BLAKE2b
    digest of its items in four 32-bit words, and (for a dict: field name -> value)
    16 slots each holding the XOR of the 32-bit digests of the fields hashed to it, so a
    mismatch can name the fields that differ.  Fixed length, so ranks whose signatures
    differ in length still make the same allreduce (and get RankMismatchError)."""
    items = list(signature.items()) if isinstance(signature, dict) else list(signature)
    slots = np.zeros(SIG_SLOTS, np.int64)
    if isinstance(signature, dict):
        for key, value in signature.items():
            slots[_slot(key)] ^= _digest([key, value], 4)[0]
    return np.concatenate([np.array([len(items)], np.int64), _digest(items, 16), slots])
