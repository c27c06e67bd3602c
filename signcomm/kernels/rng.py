"""Counter-based random bits keyed by (seed, stream, step, position).

No generator state: the random word of coordinate ``position`` at ``step`` in ``stream``
is ``splitmix64(key64(seed, stream, step) + (position + 1) * GOLDEN)``, a pure function.
So a run is reproducible, a rank can resume from a checkpoint by storing only its step,
every rank computes the *shared* stream's bits without communicating, and the CPU
(NumPy/numba) and GPU (CuPy) paths give the same bits from the same integer arithmetic.

The tie coins of the vote use one word per 64 positions (``tie_coin_bits``): the coin of
position ``p`` is bit ``p % 64`` of the word at position ``p // 64``.

Streams: each purpose (stochastic sign, zero coin, tie coin, S_1) has its own range;
rank ``r`` owns stream ``(purpose << 32) | r`` and the stream that all ranks share is
``(purpose << 32) | 0xFFFFFFFF``.
"""
from __future__ import annotations

from enum import IntEnum
from functools import lru_cache

import numpy as np

from .xp import array_module

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
SHARED_RANK = 0xFFFFFFFF


class Purpose(IntEnum):
    """What a stream of random bits is used for; each gets disjoint streams."""

    STOCHASTIC_SIGN = 1  # S_R noise, per rank (eq. 8)
    ZERO_COIN = 2        # fair coin for an exactly-zero input to sign(), per rank
    TIE_COIN = 3         # fair coin for a tied vote (2c = n), shared
    S1 = 4               # S_1 draw of the vote (eq. 11), shared


def splitmix64(z: int) -> int:
    """The SplitMix64 finaliser on a Python int (mod 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def stream_id(purpose: Purpose, rank: int | None = None) -> int:
    """Stream of ``purpose`` owned by ``rank``; ``rank=None`` is the shared stream."""
    if rank is not None and not 0 <= int(rank) < SHARED_RANK:
        raise ValueError(f"rank must be in [0, 2**32 - 1), got {rank}")
    return (int(purpose) << 32) | (SHARED_RANK if rank is None else int(rank))


@lru_cache(maxsize=4096)
def key64(seed: int, stream: int, step: int) -> int:
    """One 64-bit key from (seed, stream, step); distinct inputs give unrelated keys.
    Cached: the compressors derive every tensor's keys from the same (seed, stream,
    step) keys, three SplitMix64 rounds in Python each."""
    k = splitmix64(int(seed) & MASK64)
    k = splitmix64(k ^ (int(stream) & MASK64))
    return splitmix64(k ^ (int(step) & MASK64))


def random_words(key: int, positions):
    """64 random bits for each position (uint64 array, NumPy or CuPy like ``positions``)."""
    xp = array_module(positions)
    z = xp.asarray(positions, dtype=xp.uint64) + xp.uint64(1)
    z = z * xp.uint64(GOLDEN) + xp.uint64(key & MASK64)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(MIX2)
    return z ^ (z >> xp.uint64(31))


def uniform(key: int, positions):
    """Uniform floats in [0, 1) with 53 random bits, one per position."""
    xp = array_module(positions)
    return (random_words(key, positions) >> xp.uint64(11)).astype(xp.float64) * (2.0 ** -53)


def coin_bits(key: int, positions):
    """A fair coin (bool) per position: the top bit of its random word (the zero coins
    of sign())."""
    xp = array_module(positions)
    return (random_words(key, positions) >> xp.uint64(63)).astype(bool)


def tie_coin_bits(key: int, positions):
    """The tie coin (bool) of each position: bit ``p % 64`` of the random word at position
    ``p // 64``, so one word serves 64 consecutive positions (a tied vote draws one
    SplitMix64 per 64 coordinates, not one per tie).  The bits of a SplitMix64 word are
    each fair and independent of each other for all practical purposes, so the coins stay
    unbiased and independent across positions, and they depend only on the global
    position, whatever shard or bucket computes them."""
    xp = array_module(positions)
    p = xp.asarray(positions, dtype=xp.uint64)
    words = random_words(key, p >> xp.uint64(6))
    return ((words >> (p & xp.uint64(63))) & xp.uint64(1)).astype(bool)
