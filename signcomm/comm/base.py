"""The transport interface: the few collectives the vote schedules need."""
from __future__ import annotations

import hashlib

import numpy as np

from .ledger import Ledger, ring_allreduce_bytes, timed


class TransportError(RuntimeError):
    """A transport cannot be used as asked (not installed, not initialised, ...)."""


class RankMismatchError(ValueError):
    """Ranks disagree on what they are about to exchange (raised on every rank)."""


class RemoteRankError(RuntimeError):
    """Another rank reported an error for this call (raised on every rank)."""


OPS = ("sum", "max", "min")


class Transport:
    """Rank, size and five collectives on 1-D/2-D NumPy (or CuPy) buffers.

    Subclasses implement the ``_`` methods; this class records every call in
    ``self.ledger`` and provides ``agree``, the consistency check that turns a mismatch
    or a local failure into an error on every rank instead of a hang."""

    name = "abstract"

    def __init__(self):
        self.ledger = Ledger()

    # -- identity -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError

    # -- collectives ----------------------------------------------------------------
    def allgather(self, buf):
        """(m,) uint8 on every rank -> (n, m): row r is rank r's buffer."""
        if buf.ndim != 1 or buf.dtype != np.uint8:
            raise TypeError(f"allgather takes a 1-D uint8 buffer, got {buf.dtype} {buf.shape}")
        n, m = self.size, buf.shape[0]
        with timed() as t:
            out = self._allgather(buf)
        self.ledger.record("allgather", (n - 1) * m, (n - 1) * m, t.seconds)
        return out

    def alltoall(self, buf):
        """(n, m) uint8: row j goes to rank j -> (n, m): row j came from rank j."""
        n = self.size
        if buf.ndim != 2 or buf.shape[0] != n or buf.dtype != np.uint8:
            raise TypeError(f"alltoall takes an (n={n}, m) uint8 buffer, got {buf.dtype} {buf.shape}")
        m = buf.shape[1]
        with timed() as t:
            out = self._alltoall(buf)
        self.ledger.record("alltoall", (n - 1) * m, (n - 1) * m, t.seconds)
        return out

    def allreduce(self, buf, op: str = "sum"):
        """Elementwise reduction of a 1-D numeric buffer over ranks (a new array)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if buf.ndim != 1:
            raise TypeError(f"allreduce takes a 1-D buffer, got shape {buf.shape}")
        with timed() as t:
            out = self._allreduce(buf, op)
        b = ring_allreduce_bytes(buf.nbytes, self.size)
        self.ledger.record(f"allreduce_{op}", b, b, t.seconds)
        return out

    def broadcast(self, buf, root: int = 0):
        """Rank ``root``'s 1-D buffer on every rank (a new array)."""
        n = self.size
        with timed() as t:
            out = self._broadcast(buf, root)
        sent = (n - 1) * buf.nbytes if self.rank == root else 0
        received = 0 if self.rank == root else buf.nbytes
        self.ledger.record("broadcast", sent, received, t.seconds)
        return out

    # -- consistency -----------------------------------------------------------------
    def agree(self, signature, error: str | None = None, what: str = "this call"):
        """Check that every rank passes the same ``signature`` (a tuple of ints, strings
        or arrays) and that no rank has an ``error``; one small MAX-allreduce.  Raises
        ``RankMismatchError`` / ``RemoteRankError`` on every rank otherwise."""
        sig = _signature_words(signature)
        failed = self.rank + 1 if error else 0
        words = np.concatenate([sig, -sig, np.array([failed], np.int64)])
        with self.ledger.kind("control"):
            top = self.allreduce(words, "max")
        k = sig.shape[0]
        bad_rank = int(top[-1]) - 1
        if bad_rank >= 0:
            if error:
                raise RemoteRankError(f"rank {self.rank}: {error}")
            raise RemoteRankError(f"rank {bad_rank} failed in {what} (its own error says why); "
                                  f"stopping rank {self.rank} too")
        if not np.array_equal(top[:k], -top[k:2 * k]):
            raise RankMismatchError(
                f"ranks disagree on {what}: rank {self.rank} has {signature!r}; another rank "
                "passed a different size, dtype or segment layout")

    # -- engine hooks -----------------------------------------------------------------
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


def _signature_words(signature) -> np.ndarray:
    """A signature as a fixed number of int64 words: its length and a 128-bit BLAKE2b
    digest of its items in four 32-bit words.  Fixed length, so ranks whose signatures
    differ in length still make the same allreduce (and get RankMismatchError)."""
    digest = hashlib.blake2b(digest_size=16)
    for item in signature:
        if isinstance(item, np.ndarray):
            data = repr((item.dtype.str, item.shape)).encode() + np.ascontiguousarray(item).tobytes()
        else:
            data = repr(item).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    words = np.frombuffer(digest.digest(), dtype=np.uint32).astype(np.int64)
    return np.concatenate([np.array([len(signature)], np.int64), words])
