"""The kernels' algorithms in plain array operations.

This is the portable path: the same code runs on NumPy and CuPy arrays (``xp``).  The
numba kernels in ``_cpu.py`` must give the same bits; tests check it.  It is also the
GPU path until fused CuPy kernels exist.
"""
from __future__ import annotations

from .bits import BITORDER, packed_nbytes
from .rng import coin_bits, random_words, uniform
from .xp import array_module


def _positions(xp, d, offset):
    return xp.arange(d, dtype=xp.uint64) + xp.uint64(offset)


def sign_pack(x, zero_key=None, offset=0):
    """Returns (packed, number of non-finite inputs)."""
    xp = array_module(x)
    bits = x > 0
    if zero_key is not None:
        zeros = x == 0
        if bool(zeros.any()):
            bits |= zeros & coin_bits(zero_key, _positions(xp, x.shape[0], offset))
    nbad = int((~xp.isfinite(x)).sum())
    return xp.packbits(bits, bitorder=BITORDER), nbad


def stochastic_sign_pack(v, seg_sizes, r, key, offset=0):
    """S_R of eq. (8); returns (packed, non-finite count, clamped count)."""
    xp = array_module(v)
    v64 = v.astype(xp.float64)
    seg_sizes = xp.asarray(seg_sizes)
    r = xp.asarray(r, dtype=xp.float64)
    r_each = xp.repeat(r, seg_sizes)
    half_over_r = xp.repeat(0.5 / r, seg_sizes)
    p = 0.5 + v64 * half_over_r
    u = uniform(key, _positions(xp, v.shape[0], offset))
    bits = u < p
    nbad = int((~xp.isfinite(v64)).sum())
    clamped = int((xp.abs(v64) > r_each).sum())
    return xp.packbits(bits, bitorder=BITORDER), nbad, clamped


def counts(gathered, d):
    """Per-coordinate count of +1 bits over the n gathered rows (bit-sliced would be
    faster; this is the plain statement)."""
    xp = array_module(gathered)
    if d == 0:
        return xp.zeros(0, dtype=xp.int64)
    bits = xp.unpackbits(gathered[:, : packed_nbytes(d)], axis=1, bitorder=BITORDER)[:, :d]
    return bits.sum(axis=0, dtype=xp.int64)


def decide_from_counts(c, n, mode, key, offset=0):
    """Same contract as ``_cpu.decide_from_counts``; returns (packed, nonzero or None)."""
    xp = array_module(c)
    c = c.astype(xp.int64)
    pos = _positions(xp, c.shape[0], offset)
    nonzero = None
    if mode == 2:  # S_1, eq. (11): +1 with probability c / n
        u32 = (random_words(key, pos) >> xp.uint64(32)).astype(xp.int64)
        bits = u32 * n < (c << 32)
    else:
        bits = 2 * c > n
        tie = 2 * c == n
        if mode == 0:
            bits |= tie & coin_bits(key, pos)
        else:
            nonzero = xp.packbits(~tie, bitorder=BITORDER)
    out = xp.packbits(bits, bitorder=BITORDER)
    if nonzero is not None and c.shape[0] % 8:
        nonzero[-1] &= (1 << (c.shape[0] % 8)) - 1
    return out, nonzero


def pack_count_fields(packed, d, bits_per_field):
    xp = array_module(packed)
    per_word = 63 // bits_per_field
    nwords = -(-d // per_word)
    bits = xp.unpackbits(packed[: packed_nbytes(d)], bitorder=BITORDER)[:d].astype(xp.int64)
    bits = xp.concatenate([bits, xp.zeros(nwords * per_word - d, dtype=xp.int64)])
    shifts = xp.arange(per_word, dtype=xp.int64) * bits_per_field
    return (bits.reshape(nwords, per_word) << shifts).sum(axis=1)


def unpack_count_fields(words, d, bits_per_field):
    xp = array_module(words)
    per_word = 63 // bits_per_field
    shifts = xp.arange(per_word, dtype=xp.int64) * bits_per_field
    fields = (words.astype(xp.int64)[:, None] >> shifts) & ((1 << bits_per_field) - 1)
    return fields.reshape(-1)[:d]
