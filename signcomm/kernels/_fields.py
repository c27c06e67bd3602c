"""numba kernels of the float64 count-field words (``fields.py`` is the codec; the int64
words are ``_cpu.pack_count_fields``), and the counts hash of the compressors' shared
keys.  Each kernel has a plain NumPy twin (``*_reference``) that states the same layout
in array operations; ``tests/test_compressors.py`` keeps them identical.

Layout: coordinate ``i`` is field ``i % F`` of word ``i // F``; field ``j`` occupies bits
``j*b .. j*b + b - 1`` of the word's integer value, which is stored exactly as a float64
(``F * b <= 50 - b`` keeps it, and any sum of n such words, below 2**50 / 2**b).
"""
from __future__ import annotations

import numba
import numpy as np

from .bits import BITORDER, packed_nbytes

jit = numba.njit(cache=True, nogil=True)


def spread_table(b: int):
    """SPREAD[v] for a byte v: bit k of v moved to bit k*b.  Bits whose target would
    leave the int64 are dropped; they never occur, since a word holds f fields with
    f * b <= 50 (for b > 7, f < 8 and only the low f bits of a byte are looked up)."""
    t = np.zeros(256, np.int64)
    for v in range(256):
        t[v] = sum(((v >> k) & 1) << (k * b) for k in range(8) if k * b < 63)
    return t


_SPREAD = {}


def spread(b: int):
    if b not in _SPREAD:
        _SPREAD[b] = spread_table(b)
    return _SPREAD[b]


@jit
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@jit
def encode_fields(packed, d, b, f, table, out):
    """One bit per coordinate (``packed``, kernels' bit convention) -> ``out[w]`` = the
    float64 value of word w: the bits of coordinates w*f .. w*f + f - 1 at field
    offsets 0, b, 2b, ...  ``table`` is ``spread(b)``: eight bits are spread per lookup.
    Returns the number of 1 bits (the rank's +1 count)."""
    total = 0
    nwords = out.shape[0]
    nbytes = (d + 7) >> 3
    buf = np.uint64(0)   # bit stream reader: the next nbuf bits of packed, low bit first
    nbuf = 0
    nxt = 0
    for w in range(nwords):
        m = min(f, d - w * f)
        while nbuf < m and nxt < nbytes:
            buf |= np.uint64(packed[nxt]) << np.uint64(nbuf)
            nxt += 1
            nbuf += 8
        bits = buf & ((np.uint64(1) << np.uint64(m)) - np.uint64(1))
        buf >>= np.uint64(m)
        nbuf -= m
        total += _popcount(bits)
        acc = np.int64(0)
        t = 0
        while bits:
            acc |= table[np.int64(bits & np.uint64(0xFF))] << (8 * t * b)
            bits >>= np.uint64(8)
            t += 1
        out[w] = np.float64(acc)
    return total


@jit
def decode_fields(words, inv_scale, d, b, f, n, counts):
    """Summed (and possibly scaled) float64 words -> per-coordinate counts.

    Word w is multiplied by ``inv_scale`` (the measured 1 / scale) and rounded to the
    nearest integer.  Returns ``(max_dev, total, bad)``: the largest distance of a scaled
    word from its integer (exact sums give ~1e-13; the caller rejects > 0.25), the sum
    of all counts (checked against the header's popcount sum), and the number of words
    whose fields cannot be counts of n ranks (a field > n, bits above the last field,
    a negative value)."""
    nwords = words.shape[0]
    mask = np.int64((1 << b) - 1)
    max_dev = 0.0
    total = 0
    bad = 0
    for w in range(nwords):
        x = words[w] * inv_scale
        r = np.rint(x)
        dev = abs(x - r)
        if not dev <= max_dev:   # also catches NaN
            max_dev = dev if dev == dev else np.inf
        if not (r >= 0.0 and r < 9.0e15):
            bad += 1
            continue
        acc = np.int64(r)
        i0 = w * f
        m = min(f, d - i0)
        for j in range(m):
            c = (acc >> (j * b)) & mask
            bad += c > n
            counts[i0 + j] = c
            total += c
        if (acc >> (m * b)) != 0:
            bad += 1
    return max_dev, total, bad


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


@jit
def mix_sum(words):
    """sum over i of SplitMix64(words[i] + (i + 1) * GOLDEN), mod 2**64 (uint64): the
    body of ``wire.counts_hash``, one multiply-xorshift chain per 8 count bytes."""
    h = np.uint64(0)
    for i in range(words.shape[0]):
        z = words[i] + np.uint64(i + 1) * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        h += z ^ (z >> np.uint64(31))
    return h


def encode_fields_reference(packed, d, b, f):
    """NumPy twin of ``encode_fields``: returns (words float64, popcount)."""
    nwords = -(-d // f) if d else 0
    bits = np.unpackbits(packed[:packed_nbytes(d)], bitorder=BITORDER)[:d].astype(np.int64)
    bits = np.concatenate([bits, np.zeros(nwords * f - d, np.int64)])
    shifts = np.arange(f, dtype=np.int64) * b
    words = (bits.reshape(nwords, f) << shifts).sum(axis=1)
    return words.astype(np.float64), int(bits.sum())


def decode_fields_reference(words, inv_scale, d, b, f):
    """NumPy twin of ``decode_fields`` for exact input: returns counts (int64)."""
    ints = np.rint(words * inv_scale).astype(np.int64)
    shifts = np.arange(f, dtype=np.int64) * b
    fields = (ints[:, None] >> shifts) & ((1 << b) - 1)
    return fields.reshape(-1)[:d]
