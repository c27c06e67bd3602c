"""numba-compiled CPU kernels.  Each one has a plain NumPy/CuPy twin in ``reference.py``
that states the same algorithm in array operations; tests keep the two bit-identical.

Random words use the arithmetic of ``rng.py`` (SplitMix64 over the position), written
here in uint64 so numba never promotes to float.
"""
from __future__ import annotations

import numba
import numpy as np

U64 = numba.uint64
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
ONE = np.uint64(1)
TWO_M53 = 2.0 ** -53
CHUNK_BYTES = 1 << 13  # bytes of output per parallel task (64 Ki coordinates)

jit = numba.njit(cache=True, nogil=True)
pjit = numba.njit(cache=True, nogil=True, parallel=True)


@jit
def _word(key, pos):
    z = (np.uint64(pos) + ONE) * GOLDEN + key
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@pjit
def sign_pack(x, out, zero_key, use_zero_key, offset):
    """out[b] = bits (x > 0) of x[8b:8b+8]; an exact 0 is a coin of zero_key when
    use_zero_key, else bit 0.  Returns the number of non-finite inputs (fused check)."""
    d = x.shape[0]
    nbytes = out.shape[0]
    nchunks = (nbytes + CHUNK_BYTES - 1) // CHUNK_BYTES
    bad = np.zeros(nchunks, np.int64)
    for c in numba.prange(nchunks):
        b0 = c * CHUNK_BYTES
        b1 = min(b0 + CHUNK_BYTES, nbytes)
        nbad = 0
        for b in range(b0, b1):
            i0 = 8 * b
            byte = 0
            zeros = 0
            for k in range(min(8, d - i0)):
                v = x[i0 + k]
                byte |= np.int64(v > 0) << k
                zeros |= np.int64(v == 0) << k
                nbad += not (abs(v) < np.inf)
            if zeros and use_zero_key:
                for k in range(8):
                    if (zeros >> k) & 1:
                        byte |= np.int64(_word(zero_key, offset + i0 + k) >> np.uint64(63)) << k
            out[b] = byte
        bad[c] = nbad
    return bad.sum()


@pjit
def stochastic_sign_pack(v, seg_ends, half_over_r, r, out, key, offset):
    """S_R of eq. (8), fused with packing.  Segment s covers [seg_ends[s-1], seg_ends[s])
    with bound r[s]; coordinate i gets bit 1 with probability p = 0.5 + v_i * (0.5 / R),
    clipped to [0, 1], decided by u_i < p with u_i the top 53 bits of its random word.
    Returns (non-finite count, clamped count) where clamped counts |v_i| > R."""
    d = v.shape[0]
    nbytes = out.shape[0]
    nchunks = (nbytes + CHUNK_BYTES - 1) // CHUNK_BYTES
    bad = np.zeros(nchunks, np.int64)
    clamped = np.zeros(nchunks, np.int64)
    for c in numba.prange(nchunks):
        b0 = c * CHUNK_BYTES
        b1 = min(b0 + CHUNK_BYTES, nbytes)
        i = 8 * b0
        s = np.searchsorted(seg_ends, i, side="right")
        nbad = 0
        nclamp = 0
        for b in range(b0, b1):
            byte = 0
            for k in range(min(8, d - 8 * b)):
                while seg_ends[s] <= i:
                    s += 1
                x = np.float64(v[i])
                nbad += not (abs(x) < np.inf)
                nclamp += abs(x) > r[s]
                p = 0.5 + x * half_over_r[s]
                u = np.float64(_word(key, offset + i) >> np.uint64(11)) * TWO_M53
                byte |= np.int64(u < p) << k
                i += 1
            out[b] = byte
        bad[c] = nbad
        clamped[c] = nclamp
    return bad.sum(), clamped.sum()


@jit
def _count_block(g, b0, b1, planes):
    """Bit-sliced counters of the n rows of g over bytes [b0, b1): after the call,
    bit k of planes[j, i] is bit j of the number of rows whose byte b0+i has bit k set.
    A ripple-carry add of one row at a time; loops run over contiguous bytes so LLVM
    vectorises them."""
    n = g.shape[0]
    nplanes = planes.shape[0]
    w = b1 - b0
    carry = np.empty(w, np.uint8)
    planes[:, :w] = 0
    for r in range(n):
        for i in range(w):
            carry[i] = g[r, b0 + i]
        for j in range(nplanes):
            pj = planes[j]
            for i in range(w):
                t = pj[i] & carry[i]
                pj[i] ^= carry[i]
                carry[i] = t


VOTE_BLOCK = 4096


@pjit
def majority_vote(g, out, nonzero, tie_coin, tie_key, offset):
    """v1 (eq. 10) over gathered packed rows g (n, nbytes): out bit = 1 where 2c > n.
    Ties (2c = n, even n): tie_coin -> a fair coin of tie_key at the coordinate's
    position (offset + i); else out bit 0 and nonzero bit 0 (sign(0) = 0).
    nonzero (length 0 when unused) gets 1 where the result is not a tie."""
    n = g.shape[0]
    nbytes = g.shape[1]
    nplanes = 1
    while (1 << nplanes) <= n:
        nplanes += 1
    half = n // 2
    even = n % 2 == 0
    nblocks = (nbytes + VOTE_BLOCK - 1) // VOTE_BLOCK
    want_nonzero = nonzero.shape[0] > 0
    for blk in numba.prange(nblocks):
        b0 = blk * VOTE_BLOCK
        b1 = min(b0 + VOTE_BLOCK, nbytes)
        w = b1 - b0
        planes = np.empty((nplanes, VOTE_BLOCK), np.uint8)
        _count_block(g, b0, b1, planes)
        # Compare the bit-sliced count with `half`, most significant plane first.
        gt = np.zeros(w, np.uint8)
        eq = np.full(w, 0xFF, np.uint8)
        for j in range(nplanes - 1, -1, -1):
            pj = planes[j]
            if (half >> j) & 1:
                for i in range(w):
                    eq[i] &= pj[i]
            else:
                for i in range(w):
                    gt[i] |= eq[i] & pj[i]
                    eq[i] &= ~pj[i]
        for i in range(w):
            byte = gt[i]
            tie = eq[i] if even else np.uint8(0)
            if tie and tie_coin:
                pos = offset + 8 * (b0 + i)
                coins = 0
                for k in range(8):
                    if (tie >> k) & 1:
                        coins |= np.int64(_word(tie_key, pos + k) >> np.uint64(63)) << k
                byte |= np.uint8(coins)
            out[b0 + i] = byte
            if want_nonzero:
                nonzero[b0 + i] = ~tie
    return 0


@pjit
def counts(g, out):
    """Per-coordinate number of rows with bit 1, for gathered packed rows g (n, nbytes)."""
    n = g.shape[0]
    nbytes = g.shape[1]
    d = out.shape[0]
    nplanes = 1
    while (1 << nplanes) <= n:
        nplanes += 1
    nblocks = (nbytes + VOTE_BLOCK - 1) // VOTE_BLOCK
    for blk in numba.prange(nblocks):
        b0 = blk * VOTE_BLOCK
        b1 = min(b0 + VOTE_BLOCK, nbytes)
        planes = np.empty((nplanes, VOTE_BLOCK), np.uint8)
        _count_block(g, b0, b1, planes)
        for i in range(b1 - b0):
            base = 8 * (b0 + i)
            for k in range(min(8, d - base)):
                c = 0
                for j in range(nplanes):
                    c |= ((planes[j, i] >> k) & 1) << j
                out[base + k] = c


@pjit
def decide_from_counts(c, n, mode, key, offset, out, nonzero):
    """Packed vote from counts c (length d).  mode 0: v1 with tie coin, 1: v1 with tie
    zero (nonzero gets the mask), 2: v2, S_1 (eq. 11): bit 1 with probability c / n,
    decided exactly in integers as (u32 * n) < (c << 32), u32 the top 32 random bits."""
    d = c.shape[0]
    nbytes = out.shape[0]
    nn = np.int64(n)
    for b in numba.prange(nbytes):
        byte = 0
        nz = 0xFF
        for k in range(min(8, d - 8 * b)):
            i = 8 * b + k
            ci = np.int64(c[i])
            if mode == 2:
                u32 = np.int64(_word(key, offset + i) >> np.uint64(32))
                bit = u32 * nn < (ci << 32)
            elif 2 * ci > nn:
                bit = True
            elif 2 * ci < nn:
                bit = False
            elif mode == 0:
                bit = (_word(key, offset + i) >> np.uint64(63)) == ONE
            else:
                bit = False
                nz &= ~(1 << k)
            byte |= np.int64(bit) << k
        out[b] = byte
        if nonzero.shape[0] > 0:
            nonzero[b] = nz


@pjit
def pack_count_fields(packed, d, bits_per_field, out):
    """Spread one bit per coordinate into fields of bits_per_field bits, F = 63 // bits
    fields per int64 word: word w holds coordinates [wF, wF + F), coordinate wF + f at
    bit f * bits_per_field.  An ordinary integer sum of such words adds the fields
    exactly as long as each field's total stays below 2**bits_per_field."""
    per_word = 63 // bits_per_field
    nwords = out.shape[0]
    for w in numba.prange(nwords):
        acc = np.int64(0)
        i0 = w * per_word
        for f in range(min(per_word, d - i0)):
            i = i0 + f
            acc |= np.int64((packed[i >> 3] >> (i & 7)) & 1) << (f * bits_per_field)
        out[w] = acc


@pjit
def unpack_count_fields(words, d, bits_per_field, out):
    """Inverse of pack_count_fields after the sum: out[i] = field of coordinate i."""
    per_word = 63 // bits_per_field
    mask = (np.int64(1) << bits_per_field) - 1
    for w in numba.prange(words.shape[0]):
        i0 = w * per_word
        word = np.int64(words[w])
        for f in range(min(per_word, d - i0)):
            out[i0 + f] = (word >> (f * bits_per_field)) & mask
