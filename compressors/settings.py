"""The compressors' settings agreement: every message header carries the rank's settings,
so ranks configured differently raise ``RankMismatchError`` on every rank instead of
drifting apart (issue 18).  No extra collective: the settings ride in the allreduce the
compressor makes anyway.

Each rank sets ``BINS`` one-bit *bins* (the fields below), written in the header as digits
of the wire's own count-field layout (``wire.py``), so the allreduce sums them exactly
under Sum, Average and any pre/postscale: a bin's sum is the number of ranks that set it,
0..n.  Every rank then reads the same counts, and a setting agrees iff each of its bins
counts 0 or n ranks:

==========  ====  ==========================================================
 field      bins  a rank sets
==========  ====  ==========================================================
 kind         4   one-hot: sign, sr, s1, sign-s1 (contribute, vote)
 tie          2   one-hot: coin, zero (only when vote = "sign": unused by S_1)
 R            3   one-hot: common, local, fixed (only when contribute = "sr")
 R value     64   the bits of a fixed R as a float64 (only when R is fixed)
 seed        64   the bits of seed mod 2**64 (the random streams use exactly these)
==========  ====  ==========================================================

The one-hot fields give the number of ranks of each value, so their message lists them
(``kind differs across ranks: 'sr' on 2 of 4 ranks, 's1' on 2``); R value and seed are
compared bit by bit (exact: any two different values differ in some bin), and their
message names this rank's value (each rank raises, so the job's output shows every
rank's).  Settings that do not change the result are left out: tie under S_1, R under
sign contributions, the backend (same results), the wire (a rank with another wire sends
another dtype or length, which Horovod refuses).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from signcomm.comm.base import RankMismatchError
from signcomm.kernels import pack_bits
from signcomm.kernels.rng import MASK64

KINDS = {("sign", "sign"): "sign", ("sr", "sign"): "sr", ("sr", "s1"): "s1",
         ("sign", "s1"): "sign-s1"}
TIES = ("coin", "zero")
R_POLICIES = ("common", "local", "fixed")
FIELDS = (("kind", len(KINDS)), ("tie", len(TIES)), ("R", len(R_POLICIES)),
          ("R value", 64), ("seed", 64))
BINS = sum(width for _, width in FIELDS)


def _offsets():
    out, o = {}, 0
    for name, width in FIELDS:
        out[name] = slice(o, o + width)
        o += width
    return out


_AT = _offsets()


def _bits64(value: int) -> np.ndarray:
    return (np.uint64(value & MASK64) >> np.arange(64, dtype=np.uint64)) & np.uint64(1) == 1


@dataclass(frozen=True)
class Settings:
    """One rank's settings that change a compressor's result."""

    contribute: str
    vote: str
    tie: str
    R: object       # "common", "local" or a positive number
    seed: int

    @property
    def kind(self) -> str:
        return KINDS[(self.contribute, self.vote)]

    @property
    def policy(self) -> str:
        return self.R if isinstance(self.R, str) else "fixed"

    def bins(self) -> np.ndarray:
        """The ``BINS`` bins this rank sets (bool)."""
        b = np.zeros(BINS, bool)
        b[_AT["kind"].start + list(KINDS.values()).index(self.kind)] = True
        if self.vote == "sign":
            b[_AT["tie"].start + TIES.index(self.tie)] = True
        if self.contribute == "sr":
            b[_AT["R"].start + R_POLICIES.index(self.policy)] = True
            if self.policy == "fixed":
                pattern = struct.unpack("<Q", struct.pack("<d", float(self.R)))[0]
                b[_AT["R value"]] = _bits64(pattern)
        b[_AT["seed"]] = _bits64(int(self.seed))
        return b

    def check(self, counts, n: int, rank: int, describe):
        """Raise ``RankMismatchError`` naming every setting whose summed ``counts`` (one per
        bin, from the allreduce) show that the ranks differ; nothing if all agree.
        ``describe()`` names the tensor (called only for the message)."""
        counts = np.asarray(counts, np.int64)
        mine = {"kind": self.kind, "tie": self.tie, "R": self.R, "seed": int(self.seed)}
        differ = []
        kind = counts[_AT["kind"]]
        if kind.max() != n:   # the other fields mean different things under other kinds
            differ.append(_categorical("kind", list(KINDS.values()), kind, n))
        else:
            if self.vote == "sign" and counts[_AT["tie"]].max() != n:
                differ.append(_categorical("tie", TIES, counts[_AT["tie"]], n))
            if self.contribute == "sr":
                pol = counts[_AT["R"]]
                if pol.max() != n:
                    differ.append(_categorical("R", R_POLICIES, pol, n))
                elif not _same(counts[_AT["R value"]], n):
                    differ.append("R differs across ranks (different fixed values)")
        if not _same(counts[_AT["seed"]], n):
            differ.append("seed differs across ranks")
        if differ:
            names = [d.split(" ", 1)[0] for d in differ]
            raise RankMismatchError(
                f"{describe()}: the ranks' compressors are built with different settings: "
                f"{'; '.join(differ)}. This rank ({rank}) has "
                + ", ".join(f"{k}={mine[k]!r}" for k in names)
                + ". Build the compressor with the same options on every rank")


def _same(counts, n) -> bool:
    return bool(np.all((counts == 0) | (counts == n)))


def _categorical(name, values, counts, n) -> str:
    seen = ", ".join(f"{v!r} on {int(c)}" for v, c in zip(values, counts) if c)
    return f"{name} differs across ranks ({seen} of {n} ranks)"


@lru_cache(maxsize=256)
def packed_bins(settings: Settings) -> np.ndarray:
    """The bins packed one bit each (``signcomm.kernels`` bit order), read-only."""
    out = pack_bits(settings.bins())
    out.setflags(write=False)
    return out
