"""The kernels' algorithms in plain array operations.

This is the portable path: the same code runs on NumPy and CuPy arrays (``xp``).  The
numba kernels in ``_cpu.py`` must give the same bits; tests check it.  It is also the
GPU path until fused CuPy kernels exist.

CuPy differences handled here: ``cupy.unpackbits``/``packbits`` take no ``axis`` (so 2-D
input is unpacked flat and reshaped), ``cupy.packbits`` of an empty array returns it
unchanged rather than as uint8, and ``cupy.repeat`` takes its repeats as ints, not as an
array.
"""
from __future__ import annotations

import numpy as np

from .bits import BITORDER, packed_nbytes
from .rng import coin_bits, random_words, tie_coin_bits, uniform
from .xp import array_module


def _positions(xp, d, offset):
    return xp.arange(d, dtype=xp.uint64) + xp.uint64(offset)


def _packbits(xp, bits):
    """1-D bools -> packed uint8 (bits.py's convention), also for an empty input."""
    return xp.packbits(bits, bitorder=BITORDER).astype(xp.uint8, copy=False)


def sign_pack(x, zero_key=None, offset=0):
    """Returns (packed, number of non-finite inputs)."""
    xp = array_module(x)
    bits = x > 0
    if zero_key is not None:
        zeros = x == 0
        if bool(zeros.any()):
            bits |= zeros & coin_bits(zero_key, _positions(xp, x.shape[0], offset))
    nbad = int((~xp.isfinite(x)).sum())
    return _packbits(xp, bits), nbad


def stochastic_sign_pack(v, seg_sizes, r, key, offset=0, with_max=False):
    """S_R of eq. (8); returns (packed, non-finite count, clamped count), and with
    ``with_max`` the max |v| of each segment (host float64; NaN if it has a NaN, 0 if
    empty)."""
    xp = array_module(v)
    v64 = v.astype(xp.float64)
    reps = [int(s) for s in np.asarray(
        seg_sizes.get() if hasattr(seg_sizes, "get") else seg_sizes).ravel()]
    r = xp.asarray(r, dtype=xp.float64)
    r_each = xp.repeat(r, reps)
    half_over_r = xp.repeat(0.5 / r, reps)
    p = 0.5 + v64 * half_over_r
    u = uniform(key, _positions(xp, v.shape[0], offset))
    bits = u < p
    nbad = int((~xp.isfinite(v64)).sum())
    clamped = int((xp.abs(v64) > r_each).sum())
    if not with_max:
        return _packbits(xp, bits), nbad, clamped
    ends = np.cumsum(reps)
    seg_max = np.array([float(xp.abs(v64[e - s:e]).max()) if s else 0.0   # max keeps NaN
                        for s, e in zip(reps, ends)], dtype=np.float64)
    return _packbits(xp, bits), nbad, clamped, seg_max


def counts(gathered, d):
    """Per-coordinate count of +1 bits over the n gathered rows (bit-sliced would be
    faster; this is the plain statement)."""
    xp = array_module(gathered)
    if d == 0:
        return xp.zeros(0, dtype=xp.int64)
    n, nbytes = gathered.shape[0], packed_nbytes(d)
    rows = xp.ascontiguousarray(gathered[:, :nbytes]).reshape(-1)
    bits = xp.unpackbits(rows, bitorder=BITORDER).reshape(n, 8 * nbytes)[:, :d]
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
            bits |= tie & tie_coin_bits(key, pos)  # one word per 64 positions
        else:
            nonzero = _packbits(xp, ~tie)
    out = _packbits(xp, bits)
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
