"""Public kernels: validate, then run the numba kernel (NumPy input) or the portable
array version (CuPy input).  No MPI, no torch here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from . import _cpu, fields, reference
from .bits import BITORDER, check_packed, clear_padding, packed_nbytes
from .rules import TIE_RULES, VARIANTS, VoteRule  # noqa: F401  (re-exported)
from .xp import array_module, is_cupy


_SENTINEL = np.iinfo(np.int64).max   # the last segment end of the S_R kernel (past any d)
PARALLEL_MIN = 1 << 16   # coordinates: smaller inputs (or one numba thread) run the serial
                         # kernels (``_cpu.pick_kernel``)


def _kernel(parallel, serial, d: int):
    """``_cpu.pick_kernel`` for an input of d coordinates."""
    return _cpu.pick_kernel(parallel, serial, d, PARALLEL_MIN)


class NonFiniteError(ValueError):
    """NaN or Inf where a sign is to be taken."""


def _check_float_vector(x, name):
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat (1-D) array, got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")


def _check_gathered(gathered, d):
    if gathered.ndim != 2:
        raise ValueError(f"gathered must be 2-D (n ranks, bytes), got shape {gathered.shape}")
    if gathered.shape[0] < 1:
        raise ValueError("gathered must hold at least one rank's vector (n >= 1)")
    check_packed(gathered, d, "gathered")


def _cpu_float(x):
    """Contiguous input for the numba kernels; float16 (which numba cannot load) is
    widened to float32 exactly, so signs, zeros, NaN/Inf and S_R's float64 are unchanged."""
    if x.dtype == np.float16:
        return x.astype(np.float32)
    return np.ascontiguousarray(x)


def _cpu_rows(gathered, nbytes):
    """A C-contiguous 2-D uint8 array whose rows start with the nbytes to vote on (the
    kernels read only those), without copying when the input already is one."""
    if gathered.flags.c_contiguous:
        return gathered
    return np.ascontiguousarray(gathered[:, :nbytes])


@lru_cache(maxsize=None)
def float_bit_view(dtype):
    """(unsigned type of a float dtype's bit patterns, the mask that clears the sign
    bit, the pattern of Inf): |x| orders like ``pattern & mask``, NaN above Inf."""
    ut = np.uint32 if dtype == np.float32 else np.uint64
    return ut, ut(np.iinfo(ut).max >> 1), np.array(np.inf, dtype).view(ut)[()]


def _raise_nonfinite(nbad, name):
    if nbad:
        raise NonFiniteError(
            f"{name} has {nbad} NaN/Inf value(s); pass check_finite=False to pack them "
            "anyway (NaN packs as -1)")


def pack_signs(x, *, zero_key: Optional[int] = None, offset: int = 0,
               check_finite: bool = True):
    """sign(x) packed one bit per coordinate (bits.py's convention).

    An exact 0 has no sign: with ``zero_key`` (a ``rng.key64``) it becomes a fair coin,
    drawn at position ``offset + i``, which keeps the update unbiased; without one it
    packs as -1.  NaN/Inf raise ``NonFiniteError`` unless ``check_finite=False`` (the
    check is fused into the packing pass)."""
    _check_float_vector(x, "x")
    if is_cupy(x):
        packed, nbad = reference.sign_pack(x, zero_key, offset)
    else:
        packed = np.empty(packed_nbytes(x.shape[0]), np.uint8)
        xc = _cpu_float(x)
        ut, mask, inf_bits = float_bit_view(xc.dtype)
        kernel = _kernel(_cpu.sign_pack, _cpu.sign_pack_serial, xc.shape[0])
        nbad = kernel(xc, xc.view(ut), mask, inf_bits, packed, np.uint64(zero_key or 0),
                      zero_key is not None, offset)
    if check_finite:
        _raise_nonfinite(nbad, "x")
    return packed


def _segments(d, r, seg_sizes, xp):
    """(R per segment on the host, segment sizes), validated."""
    if seg_sizes is None and np.ndim(r) == 0 and not is_cupy(r):   # one R (the common
        rv = float(r)                                              # case): no array checks
        if not (math.isfinite(rv) and rv > 0):
            raise ValueError(f"R must be positive and finite; segment 0 has R={rv!r}")
        return np.array([rv]), np.array([d], dtype=np.int64)
    r = np.atleast_1d(np.asarray(r, dtype=np.float64)) if not is_cupy(r) else r.astype(xp.float64)
    if seg_sizes is None:
        if r.shape[0] != 1:
            raise ValueError(f"{r.shape[0]} values of R given without seg_sizes")
        seg_sizes = np.array([d], dtype=np.int64)
    seg_sizes = np.asarray(seg_sizes if not is_cupy(seg_sizes) else seg_sizes.get(),
                           dtype=np.int64)
    r_host = r if not is_cupy(r) else r.get()
    if seg_sizes.ndim != 1 or r_host.shape != seg_sizes.shape:
        raise ValueError(f"R has {r_host.shape[0]} values but there are {seg_sizes.shape[0]} segments")
    if (seg_sizes < 0).any() or int(seg_sizes.sum()) != d:
        raise ValueError(f"segment sizes must be >= 0 and sum to d={d}, got sum {int(seg_sizes.sum())}")
    bad = ~(np.isfinite(r_host) & (r_host > 0))
    if bad.any():
        s = int(np.flatnonzero(bad)[0])
        raise ValueError(f"R must be positive and finite; segment {s} has R={r_host[s]!r}")
    return r_host, seg_sizes


def stochastic_sign_pack(v, r, key: int, *, seg_sizes=None, offset: int = 0,
                         check_finite: bool = True, max_abs: bool = False):
    """S_R(v) of Definition 1, eq. (8), packed: coordinate i is +1 with probability
    (R + v_i) / (2R), so E[S_R(v)] = v / R.  ``r`` is one R, or one per segment of the
    flat buffer with ``seg_sizes`` giving the segment lengths (summing to len(v)).
    Randomness: ``key`` (a ``rng.key64``, normally the rank's own stream) at position
    ``offset + i``.  |v_i| > R is clamped to probability 0 or 1.

    Returns ``(packed, clamped)``; ``clamped`` counts coordinates with |v_i| > R.  With
    ``max_abs=True``, ``(packed, clamped, seg_max)``: max |v| of each segment found in the
    same pass, as ``contribution.local_max_abs`` gives it (float64; NaN for a segment with
    a NaN, 0 for an empty one).
    """
    _check_float_vector(v, "v")
    xp = array_module(v)
    d = v.shape[0]
    r_host, seg_sizes = _segments(d, r, seg_sizes, xp)
    if is_cupy(v):
        packed, nbad, clamped, seg_max = reference.stochastic_sign_pack(
            v, seg_sizes, r_host, key, offset, with_max=True)
    else:
        packed = np.empty(packed_nbytes(d), np.uint8)
        if seg_sizes.shape[0] == 1:   # one segment: no masks (a few us a tensor)
            nonempty = slice(0, 1 if d else 0)
            seg_ends = np.array([d, _SENTINEL] if d else [_SENTINEL], np.int64)
            rr = np.array([r_host[0], 1.0] if d else [1.0], np.float64)
        else:
            nonempty = seg_sizes > 0
            k = int(np.count_nonzero(nonempty))
            seg_ends = np.empty(k + 1, np.int64)
            seg_ends[:k] = np.cumsum(seg_sizes)[nonempty]
            seg_ends[k] = _SENTINEL
            rr = np.empty(k + 1, np.float64)
            rr[:k] = r_host[nonempty]
            rr[k] = 1.0
        vc = _cpu_float(v)
        ut, mask, inf_bits = float_bit_view(vc.dtype)
        found = np.zeros(seg_ends.shape[0], ut)
        kernel = _kernel(_cpu.stochastic_sign_pack, _cpu.stochastic_sign_pack_serial, d)
        nbad, clamped = kernel(vc, vc.view(ut), mask, inf_bits, seg_ends, 0.5 / rr, rr, packed,
                               found, np.uint64(key), offset)
        seg_max = np.zeros(seg_sizes.shape[0], np.float64)
        seg_max[nonempty] = found[:-1].view(vc.dtype)   # a NaN pattern stays NaN
    if check_finite:
        _raise_nonfinite(nbad, "v")
    if not max_abs:
        return packed, int(clamped)
    return packed, int(clamped), seg_max


@dataclass
class Vote:
    """A packed vote result.  ``bits``: 1 = +1, 0 = -1.  ``nonzero``: None, or packed
    bits that are 0 where the result is 0 (a tie under the tie rule "zero")."""

    bits: object
    nonzero: object = None

    def values(self, d: int, dtype=np.float32):
        """+1/-1 (and 0 for ties under "zero") as a float array of length d
        (``vote_values``, the one decode)."""
        return vote_values(self, d, dtype=dtype)


def vote_values(vote: Vote, d: int, *, out=None, dtype=np.float32):
    """The one decode of a packed vote to floats: +1 where a bit is 1, -1 where it is 0,
    times the ``nonzero`` bit when the vote has a tie mask (0 for a tie under "zero").
    NumPy: one numba pass into ``out`` (float32, made if None); CuPy: array ops."""
    check_packed(vote.bits, d, "bits")
    if vote.nonzero is not None:
        check_packed(vote.nonzero, d, "nonzero")
    if is_cupy(vote.bits):
        xp = array_module(vote.bits)
        o = xp.unpackbits(vote.bits[: packed_nbytes(d)], bitorder=BITORDER)[:d].astype(dtype) * 2 - 1
        if vote.nonzero is not None:
            o *= xp.unpackbits(vote.nonzero[: packed_nbytes(d)], bitorder=BITORDER)[:d].astype(dtype)
        return o
    if out is None:
        out = np.empty(d, np.float32)
    nz = vote.nonzero
    _cpu.vote_values(vote.bits, nz if nz is not None else np.zeros(0, np.uint8),
                     nz is not None, d, out)
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


def _rule(rule, variant, tie, key) -> VoteRule:
    rule = VoteRule.of(rule, variant=variant, tie=tie)
    rule.check_key(key)
    return rule


def majority_vote(gathered, d: int, *, variant: str = "v1", tie: str = "coin",
                  key: Optional[int] = None, offset: int = 0, rule: VoteRule = None) -> Vote:
    """The vote over n gathered packed vectors (rows of ``gathered``, shape (n, bytes)).

    With c the number of +1 bits at a coordinate, a = (2c - n) / n:
    - v1 (eq. 10): o = sign(a); a tie (2c = n, even n) is a fair coin of ``key`` under
      ``tie="coin"`` (the default: one bit, and unbiased, E[o] = 0 = sign(0)), or
      o = 0 under ``tie="zero"`` (``Vote.nonzero`` marks it).
    - v2 (eq. 11): o = S_1(a), +1 with probability c / n, drawn from ``key``.
    ``key`` must be the same on every rank (the shared stream) so every rank gets the
    same o; positions are ``offset + i``.  CPU: bit-sliced popcount (numba).
    ``rule`` (a ``VoteRule``) replaces ``variant`` and ``tie`` when given.
    """
    _check_gathered(gathered, d)
    rule = _rule(rule, variant, tie, key)
    variant, tie = rule.variant, rule.tie
    n = gathered.shape[0]
    nbytes = packed_nbytes(d)
    g = gathered[:, :nbytes]
    if is_cupy(g) or (variant == "v2" and n >= 256):
        return vote_from_counts(vote_counts(g, d), n, rule=rule, key=key, offset=offset)
    out = np.empty(nbytes, np.uint8)
    if variant == "v2":  # fused counts + S_1, same bits as vote_from_counts(vote_counts())
        _cpu.vote_s1(_cpu_rows(gathered, nbytes), nbytes, d, np.uint64(key), offset, out)
        return Vote(out)
    nonzero = np.empty(nbytes if tie == "zero" else 0, np.uint8)
    _cpu.majority_vote(_cpu_rows(gathered, nbytes), nbytes, out, nonzero, tie == "coin",
                       np.uint64(key or 0), offset)
    clear_padding(out, d)
    if tie == "zero":
        return Vote(out, clear_padding(nonzero, d) if n % 2 == 0 else None)
    return Vote(out)


def vote_counts(gathered, d: int):
    """Per-coordinate number of ranks with bit +1 (int64 for CuPy, the smallest unsigned
    type that holds n for NumPy)."""
    _check_gathered(gathered, d)
    if is_cupy(gathered):
        return reference.counts(gathered, d)
    n = gathered.shape[0]
    out = np.empty(d, np.uint8 if n < 256 else (np.uint16 if n < 65536 else np.uint32))
    _cpu.counts(_cpu_rows(gathered, packed_nbytes(d)), out)
    return out


def vote_from_counts(counts, n: int, *, variant: str = "v1", tie: str = "coin",
                     key: Optional[int] = None, offset: int = 0, rule: VoteRule = None) -> Vote:
    """The vote of ``majority_vote`` from per-coordinate counts c (0 <= c <= n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    mode = _rule(rule, variant, tie, key).mode
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if is_cupy(counts):
        bits, nonzero = reference.decide_from_counts(counts, n, mode, key, offset)
    else:
        d = counts.shape[0]
        bits = np.empty(packed_nbytes(d), np.uint8)
        nonzero = np.empty(packed_nbytes(d) if mode == 1 else 0, np.uint8)
        kernel = _kernel(_cpu.decide_from_counts, _cpu.decide_from_counts_serial, d)
        kernel(np.ascontiguousarray(counts), n, mode, np.uint64(key or 0), offset, bits, nonzero)
        nonzero = clear_padding(nonzero, d) if mode == 1 else None
    if nonzero is not None and n % 2:
        nonzero = None  # odd n never ties
    return Vote(bits, nonzero)


def vote_values_from_counts(counts, n: int, *, rule: VoteRule, key: Optional[int] = None,
                            offset: int = 0, out=None):
    """``vote_from_counts(...).values(d)`` in one pass (NumPy counts): float32 +1/-1 (0
    for a tie under "zero") of length d, in ``out`` if given; CuPy counts take the two
    steps.  From ``_cpu.STREAM_MIN`` values on, an ``out`` aligned to 32 bytes is written
    with non-temporal stores (``aligned_empty`` makes one)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    mode = _rule(rule, "v1", "coin", key).mode
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    d = counts.shape[0]
    if is_cupy(counts):
        return vote_from_counts(counts, n, rule=rule, key=key, offset=offset).values(d)
    if out is None:
        out = np.empty(d, np.float32)
    elif out.shape != (d,) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of length {d}")
    stream = d >= _cpu.STREAM_MIN and out.ctypes.data % 32 == 0
    kernel = _kernel(_cpu.decide_values, _cpu.decide_values_serial, d)
    kernel(np.ascontiguousarray(counts), n, mode, np.uint64(key or 0), offset, out, stream)
    return out


def aligned_empty(d: int, dtype=np.float32, align: int = 64):
    """An empty 1-D array of d elements whose data starts at a multiple of ``align``
    bytes (a view into a slightly longer one)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(d + align // itemsize, dtype)
    skip = (-raw.ctypes.data % align) // itemsize
    return raw[skip:skip + d]


def count_field_bits(n: int) -> int:
    """ceil(log2(n + 1)): bits of a field that holds a count from 0 to n (``fields``)."""
    return fields.field_bits(n)


def count_field_words(d: int, bits_per_field: int) -> int:
    """int64 words that hold d fields (63 // bits_per_field fields per word)."""
    return fields.data_words(d, bits_per_field, "int64")


def pack_count_fields(packed, d: int, bits_per_field: int):
    """One bit per coordinate -> int64 count-field words (the codec of ``fields.py``);
    summing such words over ranks gives exact counts."""
    check_packed(packed, d)
    if not 1 <= bits_per_field <= 63:
        raise ValueError(f"bits_per_field must be in [1, 63], got {bits_per_field}")
    return fields.pack_int64(packed, d, bits_per_field)


def unpack_count_fields(words, d: int, bits_per_field: int):
    """Summed int64 field words -> per-coordinate counts (int64)."""
    return fields.unpack_int64(words, d, bits_per_field)
