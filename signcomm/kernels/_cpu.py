"""numba-compiled CPU kernels.  Each one has a plain NumPy/CuPy twin in ``reference.py``
that states the same algorithm in array operations; tests keep the two bit-identical.

Random words use the arithmetic of ``rng.py`` (SplitMix64 over the position), written
here in uint64 so numba never promotes to float.

Speed notes (what makes these loops fast on a plain AVX2 CPU; ``benchmarks/kernel_bench.py``
measures them against a memory copy):

- Every hot loop is branch-free over contiguous memory so LLVM vectorises it; rare cases
  (an exact zero, a tied vote) get a separate sparse pass instead of a branch per element.
- Bits are assembled eight at a time: a uint64 whose 8 bytes are 0/1 flags becomes the
  packed byte with one multiply (``_pack8``), and back with ``_spread8``.
- The vote counts 64 coordinates per uint64 word with bit-sliced counters (one bit plane
  per bit of the count), over blocks of words that stay in L1, split over threads.
- Words are read from packed bytes through little-endian uint64 views (x86, ARM).
- Small counters are int32 (vectorises); each parallel task's totals are summed at the end.
- NaN/Inf checks ride on an integer max of the float bit patterns (sign bit cleared);
  only a task whose max reaches Inf counts them, in a second pass.
- A large float output (``decide_values``) is written with non-temporal stores: a plain
  store first reads the cache line it overwrites, half the traffic of a write-only pass.
- On AVX-512 CPUs LLVM vectorises with 256-bit vectors unless told otherwise; the loops
  that gain from 512-bit ones call ``_wide_vectors()`` (S_R 1.20 -> 0.93 ns/param, sign
  0.63 -> 0.53, the radix decode 0.59 -> 0.53 at n = 2; measured interleaved in one
  process, same bits).  The S_1 draw does not gain (its two 64-bit multiplies per
  coordinate bind one port at either width), so it keeps the default.
- Inner loops index a slice with the loop counter (``xs[k]`` for ``k in range(m)``), not
  ``x[i0 + k]``: numba wraps negative indices, and when LLVM cannot prove an index is
  >= 0 the wraparound branch stops vectorisation (measured: 5x slower).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types as _nbtypes
from numba.extending import intrinsic as _intrinsic

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
ONE = np.uint64(1)
TWO_M53 = 2.0 ** -53
TWO_31 = 2147483648.0
LO31 = np.uint64(0x7FFFFFFF)
PACK8 = np.uint64(0x0102040810204080)    # (w * PACK8) >> 56: low bit of each byte -> bit k
LANE_BITS = np.uint64(0x8040201008040201)  # bit k of byte k
LANE_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
LANE_ONES = np.uint64(0x0101010101010101)

SIGN_CHUNK = 1 << 16   # coordinates per parallel task in sign_pack (multiple of 64)
SR_CHUNK = 1 << 13     # coordinates per parallel task in stochastic_sign_pack (multiple of 64)
VOTE_WORDS = 512       # uint64 words per row per vote block: n * 4 KiB read per block



def _host_has(feature: str) -> bool:
    try:
        import llvmlite.binding as ll
        return f"+{feature}" in ll.get_host_cpu_features().flatten().split(",")
    except Exception:  # pragma: no cover - then the portable code runs
        return False


# AVX-512DQ converts uint64 -> float64 in vectors (a compile-time constant of the kernels;
# numba's cache is keyed by the host CPU, so a cached kernel matches its host)
HAVE_U64_TO_F64 = _host_has("avx512dq")

jit = numba.njit(cache=True, nogil=True)


def pick_kernel(parallel, serial, size: int, minimum: int):
    """``parallel`` for an input of at least ``minimum`` units when numba has more than
    one thread, else ``serial``, the same kernel on the calling thread: waking the thread
    pool costs more than a small input (tens of microseconds; milliseconds on busy cores,
    where a model's many small tensors each pay it)."""
    return parallel if size >= minimum and numba.get_num_threads() > 1 else serial


@_intrinsic
def _stream8(typingctx, dst, di, src, si):
    """dst[di:di+8] = src[si:si+8] (float32) with one non-temporal 32-byte store (it
    bypasses the caches: no read of the destination line first).  dst's address at di
    must be 32-byte aligned (the store faults otherwise); unchecked."""
    sig = _nbtypes.void(dst, _nbtypes.intp, src, _nbtypes.intp)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        vt = ir.VectorType(ir.FloatType(), 8)
        v = builder.load(builder.bitcast(builder.gep(s.data, [args[3]]), vt.as_pointer()))
        v.align = 4
        st = builder.store(v, builder.bitcast(builder.gep(d.data, [args[1]]), vt.as_pointer()))
        st.align = 32
        st.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _store_fence(typingctx):
    """A full fence: orders the non-temporal stores before it with what follows."""
    sig = _nbtypes.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _wide_vectors(typingctx):
    """Lets LLVM vectorise the function that calls it with 512-bit vectors (function
    attribute ``"prefer-vector-width"="512"``; it emits no code).  LLVM's default for
    AVX-512 CPUs is 256-bit vectors, half the lanes for the S_R loop's SplitMix64 and
    the codec's integer loops.  Same arithmetic, same bits; on a host
    without AVX-512 the vectors stay as wide as the host has.  In a ``prange`` body it
    must be called inside the loop: numba outlines that body into its own function.
    (llvmlite's attribute set accepts only LLVM's keyword attributes, so the string
    attribute goes in past its check; llvmlite prints it verbatim.)"""
    sig = _nbtypes.void()

    def codegen(context, builder, signature, args):
        try:   # speed only: without it the loops are the same, in 256-bit vectors
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # pragma: no cover - an llvmlite without set-based attributes
            pass
        return context.get_dummy_value()

    return sig, codegen


pjit = numba.njit(cache=True, nogil=True, parallel=True)


@jit
def _word(key, pos):
    z = (np.uint64(pos) + ONE) * GOLDEN + key
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@jit
def _pack8(w):
    """uint64 whose byte k is 0 or 1 -> one byte with bit k = byte k (little bit order).
    The multiply moves byte k's low bit to bit 56 + k; no two partial products collide
    in bits 56..63."""
    return np.uint8((w * PACK8) >> np.uint64(56))


@jit
def _spread8(b):
    """Inverse of _pack8: byte b -> uint64 whose byte k is bit k of b (0 or 1)."""
    x = (np.uint64(b) * LANE_ONES) & LANE_BITS
    return ((x + LANE_LOW7) >> np.uint64(7)) & LANE_ONES


@jit
def _nplanes(n):
    """Bits of a count from 0 to n (bit_length(n))."""
    p = 1
    while (1 << p) <= n:
        p += 1
    return p


# ---------------------------------------------------------------------------------------
# sign and S_R, fused with packing


@jit
def _sign_chunk(c, x, xbits, mask, inf_bits, out, zero_key, use_zero_key, offset):
    """Coordinates c*SIGN_CHUNK .. of ``sign_pack``; returns their non-finite count."""
    _wide_vectors()
    d = x.shape[0]
    i0 = c * SIGN_CHUNK
    i1 = min(i0 + SIGN_CHUNK, d)
    m = i1 - i0
    xs = x[i0:i1]
    us = xbits[i0:i1]
    flags = np.empty((m + 7) & ~7, np.uint8)   # (a small tensor: a small buffer)
    nzero = np.int32(0)
    mc = mask ^ mask
    for k in range(m):
        v = xs[k]
        flags[k] = v > 0
        nzero += np.int32(v == 0)
        ub = us[k] & mask
        mc = ub if ub > mc else mc
    for k in range(m, (m + 7) & ~7):   # the last, partial byte: padding bits 0
        flags[k] = 0
    fw = flags.view(np.uint64)
    os = out[i0 >> 3:]
    for b in range((m + 7) >> 3):
        os[b] = _pack8(fw[b])
    if nzero > 0 and use_zero_key:  # rare: a sparse pass over this chunk
        for k in range(m):
            if xs[k] == 0:
                coin = np.uint8(_word(zero_key, offset + i0 + k) >> np.uint64(63))
                os[k >> 3] |= coin << np.uint8(k & 7)
    nbad = np.int32(0)
    if mc >= inf_bits:   # rare: count the NaN/Inf of this chunk
        for k in range(m):
            nbad += np.int32(not (abs(xs[k]) < np.inf))
    return nbad


@pjit
def sign_pack(x, xbits, mask, inf_bits, out, zero_key, use_zero_key, offset):
    """out[b] = bits (x > 0) of x[8b:8b+8]; an exact 0 is a coin of zero_key when
    use_zero_key, else bit 0.  Returns the number of non-finite inputs (fused check: an
    integer max of ``xbits & mask``, x's bit patterns without the sign bit, as in
    ``stochastic_sign_pack``; only a task whose max reaches ``inf_bits`` counts them).
    Parallel over chunks (``sign_pack_serial``: the same on the calling thread)."""
    nchunks = (x.shape[0] + SIGN_CHUNK - 1) // SIGN_CHUNK
    bad = np.zeros(nchunks, np.int64)
    for c in numba.prange(nchunks):
        bad[c] = _sign_chunk(c, x, xbits, mask, inf_bits, out, zero_key, use_zero_key, offset)
    return bad.sum()


@jit
def sign_pack_serial(x, xbits, mask, inf_bits, out, zero_key, use_zero_key, offset):
    """``sign_pack`` on the calling thread (small inputs: no thread-pool wake-up)."""
    nbad = 0
    for c in range((x.shape[0] + SIGN_CHUNK - 1) // SIGN_CHUNK):
        nbad += _sign_chunk(c, x, xbits, mask, inf_bits, out, zero_key, use_zero_key, offset)
    return nbad


@jit
def _value_of(pattern, scratch, v):
    """The float64 value of the bit pattern ``pattern`` of v's dtype (``scratch``: one
    element of the pattern's type, overwritten)."""
    scratch[0] = pattern
    return np.float64(scratch.view(v.dtype)[0])


@jit
def _sr_chunk(c, v, vbits, mask, inf_bits, seg_ends, half_over_r, r, out, piece_max, base):
    """Coordinates c*SR_CHUNK .. of ``stochastic_sign_pack``: their bits, the max pattern
    of each segment piece (piece_max[c + s]); returns (non-finite, clamped) counts."""
    _wide_vectors()
    d = v.shape[0]
    i0 = c * SR_CHUNK
    i1 = min(i0 + SR_CHUNK, d)
    flags = np.empty(SR_CHUNK, np.uint8)
    scratch = np.empty(1, vbits.dtype)   # for _value_of
    for k in range((i1 - i0) & ~7, (i1 - i0 + 7) & ~7):   # padding bits of the last byte
        flags[k] = 0
    s = np.searchsorted(seg_ends, i0, side="right")
    nbad = np.int32(0)
    nclamp = np.int32(0)
    mc = mask ^ mask   # the max over this task's pieces
    a = i0
    while a < i1:
        e = min(i1, seg_ends[s])
        rs = r[s]
        hs = half_over_r[s]
        vs = v[a:e]
        us = vbits[a:e]
        fs = flags[a - i0:e - i0]
        base_a = np.uint64(a) * GOLDEN + base
        m = mask ^ mask   # 0 of the mask's type
        for k in range(e - a):
            x = np.float64(vs[k])
            ub = us[k] & mask
            m = ub if ub > m else m
            z = np.uint64(k) * GOLDEN + base_a
            z = (z ^ (z >> np.uint64(30))) * MIX1
            z = (z ^ (z >> np.uint64(27))) * MIX2
            z = z ^ (z >> np.uint64(31))
            if HAVE_U64_TO_F64:
                u = np.float64(z >> np.uint64(11)) * TWO_M53
            else:
                hi = np.float64(np.int32(z >> np.uint64(42)))
                lo = np.float64(np.int32((z >> np.uint64(11)) & LO31))
                u = (hi * TWO_31 + lo) * TWO_M53
            fs[k] = u < 0.5 + x * hs
        piece_max[c + s] = m
        if not _value_of(m, scratch, vs) <= rs:   # some |v| > R, or a NaN: count the
            for k in range(e - a):           # clamped ones (rare: R is the bound)
                nclamp += np.int32(abs(np.float64(vs[k])) > rs)
        mc = m if m > mc else mc
        a = e
        s += 1
    if mc >= inf_bits:   # a NaN or Inf in this task's piece: count them (rare)
        vs = v[i0:i1]
        for k in range(i1 - i0):
            nbad += np.int32(not (abs(np.float64(vs[k])) < np.inf))
    fw = flags.view(np.uint64)
    os = out[i0 >> 3:]
    for b in range(min(SR_CHUNK >> 3, os.shape[0])):
        os[b] = _pack8(fw[b])
    return nbad, nclamp


@jit
def _sr_segment_max(d, seg_ends, piece_max, seg_max):
    """seg_max[s] = the max of segment s's pieces (the same walk as ``_sr_chunk``)."""
    for c in range((d + SR_CHUNK - 1) // SR_CHUNK):
        i0 = c * SR_CHUNK
        i1 = min(i0 + SR_CHUNK, d)
        s = np.searchsorted(seg_ends, i0, side="right")
        a = i0
        while a < i1:
            m = piece_max[c + s]
            seg_max[s] = m if m > seg_max[s] else seg_max[s]
            a = min(i1, seg_ends[s])
            s += 1


@pjit
def stochastic_sign_pack(v, vbits, mask, inf_bits, seg_ends, half_over_r, r, out, seg_max, key,
                         offset):
    """S_R of eq. (8), fused with packing.  Segment s covers [seg_ends[s-1], seg_ends[s])
    with bound r[s] (seg_ends ends with a sentinel past d); coordinate i gets bit 1 with
    probability p = 0.5 + v_i * (0.5 / R), clipped to [0, 1], decided by u_i < p with
    u_i the top 53 bits of its random word times 2**-53.  Returns (non-finite count,
    clamped count) where clamped counts |v_i| > R.  Fused too, as in
    ``contribution._max_abs_bits``: seg_max[s] (zeros on entry, one per entry of
    seg_ends) becomes the largest ``vbits[i] & mask`` over segment s, with vbits v's bit
    patterns and mask clearing the sign bit: the pattern of max |v| or of a NaN (an
    integer max vectorises; a float one with NaN rules does not).  Each parallel task
    keeps the max of its piece of each segment, reduced at the end.  The non-finite
    count comes from the same max: only a task whose max pattern reaches ``inf_bits``
    (the pattern of Inf) counts its NaN/Inf, in a second pass over its piece (rare), and
    only a piece whose max exceeds its R counts its clamped coordinates.

    The 53-bit integer z >> 11 becomes a float64 exactly, in one conversion where the
    host has AVX-512DQ (vector uint64 -> float64), else in two exact int32 halves
    (22 + 31 bits: AVX2 has no vector int64 -> float conversion); same value.
    Parallel over chunks (``stochastic_sign_pack_serial``: the same on the calling
    thread)."""
    d = v.shape[0]
    nchunks = (d + SR_CHUNK - 1) // SR_CHUNK
    bad = np.zeros(nchunks, np.int64)
    clamped = np.zeros(nchunks, np.int64)
    piece_max = np.zeros(nchunks + seg_ends.shape[0], vbits.dtype)  # (chunk c, segment s) -> c + s
    base = np.uint64(offset) * GOLDEN + GOLDEN + key  # word of i: mix(i * GOLDEN + base)
    for c in numba.prange(nchunks):
        bad[c], clamped[c] = _sr_chunk(c, v, vbits, mask, inf_bits, seg_ends, half_over_r, r,
                                       out, piece_max, base)
    _sr_segment_max(d, seg_ends, piece_max, seg_max)
    return bad.sum(), clamped.sum()


@jit
def stochastic_sign_pack_serial(v, vbits, mask, inf_bits, seg_ends, half_over_r, r, out,
                                seg_max, key, offset):
    """``stochastic_sign_pack`` on the calling thread (small inputs: no thread-pool
    wake-up)."""
    d = v.shape[0]
    nchunks = (d + SR_CHUNK - 1) // SR_CHUNK
    piece_max = np.zeros(nchunks + seg_ends.shape[0], vbits.dtype)
    base = np.uint64(offset) * GOLDEN + GOLDEN + key
    nbad = 0
    nclamp = 0
    for c in range(nchunks):
        b, k = _sr_chunk(c, v, vbits, mask, inf_bits, seg_ends, half_over_r, r, out,
                         piece_max, base)
        nbad += b
        nclamp += k
    _sr_segment_max(d, seg_ends, piece_max, seg_max)
    return nbad, nclamp


# ---------------------------------------------------------------------------------------
# the vote


@jit
def _count_block(g, b0, w, planes, carry):
    """Bit-sliced counters of the n rows of g over the 8w bytes from b0, as uint64 words:
    after the call bit m of planes[j, i] is bit j of the number of rows whose word i has
    bit m set.  Rows are added one at a time (ripple carry through the planes that the
    count can reach so far); each loop runs over w contiguous words, so it vectorises."""
    n = g.shape[0]
    nplanes = planes.shape[0]
    row = g[0, b0:b0 + 8 * w].view(np.uint64)
    p0 = planes[0]
    for i in range(w):
        p0[i] = row[i]
    for j in range(1, nplanes):
        pj = planes[j]
        for i in range(w):
            pj[i] = 0
    for r in range(1, n):
        row = g[r, b0:b0 + 8 * w].view(np.uint64)
        for i in range(w):
            x = row[i]
            carry[i] = p0[i] & x
            p0[i] ^= x
        top = _nplanes(r + 1)  # the count is at most r + 1 now
        for j in range(1, top):
            pj = planes[j]
            for i in range(w):
                cy = carry[i]
                t = pj[i] & cy
                pj[i] ^= cy
                carry[i] = t


@jit
def _compare_half(planes, w, half, gt, eq):
    """gt[i] bit m = (count > half), eq[i] bit m = (count == half), most significant
    plane first."""
    for i in range(w):
        gt[i] = 0
        eq[i] = ~np.uint64(0)
    for j in range(planes.shape[0] - 1, -1, -1):
        pj = planes[j]
        if (half >> j) & 1:
            for i in range(w):
                eq[i] &= pj[i]
        else:
            for i in range(w):
                gt[i] |= eq[i] & pj[i]
                eq[i] &= ~pj[i]


@jit
def _tie_coins(gt, eq, w, key, pos0, res):
    """res[i] = gt[i] with each bit m set in eq[i] (a tie) replaced by the tie coin of
    position p = pos0 + 64 i + m: bit p % 64 of the word at position p // 64 (rng.py's
    tie_coin_bits).  gt and eq are disjoint; res may be gt.

    One SplitMix64 serves 64 coordinates: word i needs the words q + i and, unless pos0
    is a multiple of 64 (a shard or bucket need not be), q + i + 1 (q = pos0 // 64,
    s = pos0 % 64: coin word = (W[q+i] >> s) | (W[q+i+1] << (64 - s))); the second is
    kept for the next word.  A word without a tie draws nothing."""
    q = pos0 >> 6
    s = np.uint64(pos0 & 63)
    ls = np.uint64(64) - s
    nxt = np.uint64(0)
    have_nxt = False  # nxt holds the word at position q + i
    for i in range(w):
        t = eq[i]
        r = gt[i]
        if t:
            lo = nxt if have_nxt else _word(key, q + i)
            if s:
                nxt = _word(key, q + i + 1)
                have_nxt = True
                lo = (lo >> s) | (nxt << ls)
            r |= t & lo
        else:
            have_nxt = False
        res[i] = r


@jit
def _v1_block(g, b0, w, n, tie_coin, tie_key, pos0, planes, carry, gt, eq, res, nz):
    """v1 over the 8w bytes of g from b0: res[i] = packed o, nz[i] = packed (o != 0).
    pos0 = position of the block's first coordinate."""
    _count_block(g, b0, w, planes, carry)
    half = n // 2
    _compare_half(planes, w, half, gt, eq)
    if n % 2:  # odd n never ties
        for i in range(w):
            res[i] = gt[i]
            nz[i] = ~np.uint64(0)
    else:
        if tie_coin:
            _tie_coins(gt, eq, w, tie_key, pos0, res)
        else:
            for i in range(w):
                res[i] = gt[i]
        for i in range(w):
            nz[i] = ~eq[i]


@jit
def _tail_rows(g, nbytes):
    """The last nbytes % 8 bytes of each row, zero-padded to one uint64 word per row."""
    n = g.shape[0]
    b0 = nbytes - nbytes % 8
    t = np.zeros((n, 8), np.uint8)
    for r in range(n):
        for b in range(b0, nbytes):
            t[r, b - b0] = g[r, b]
    return t


@jit
def _store_tail(word, out, b0, nbytes):
    for b in range(b0, nbytes):
        out[b] = np.uint8((word >> np.uint64(8 * (b - b0))) & np.uint64(0xFF))


@pjit
def majority_vote(g, nbytes, out, nonzero, tie_coin, tie_key, offset):
    """v1 (eq. 10) over gathered packed rows g[:, :nbytes] (n rows): out bit = 1 where
    2c > n, i.e. c > n // 2.  Ties (2c = n, even n): tie_coin -> a fair coin of tie_key
    at the coordinate's position (offset + i); else out bit 0 and nonzero bit 0
    (sign(0) = 0).  nonzero (length 0 when unused) gets 1 where the result is not a tie.
    Padding bits of the result are whatever the padding of the input gives (the caller
    clears them)."""
    n = g.shape[0]
    nplanes = _nplanes(n)
    nwords = nbytes // 8
    nblocks = (nwords + VOTE_WORDS - 1) // VOTE_WORDS
    want_nonzero = nonzero.shape[0] > 0
    for blk in numba.prange(nblocks + 1):
        planes = np.empty((nplanes, VOTE_WORDS), np.uint64)
        carry = np.empty(VOTE_WORDS, np.uint64)
        gt = np.empty(VOTE_WORDS, np.uint64)
        eq = np.empty(VOTE_WORDS, np.uint64)
        res = np.empty(VOTE_WORDS, np.uint64)
        nz = np.empty(VOTE_WORDS, np.uint64)
        if blk < nblocks:
            w0 = blk * VOTE_WORDS
            w = min(VOTE_WORDS, nwords - w0)
            b0 = 8 * w0
            _v1_block(g, b0, w, n, tie_coin, tie_key, offset + 8 * b0,
                      planes, carry, gt, eq, res, nz)
            ow = out[b0:b0 + 8 * w].view(np.uint64)
            for i in range(w):
                ow[i] = res[i]
            if want_nonzero:
                zw = nonzero[b0:b0 + 8 * w].view(np.uint64)
                for i in range(w):
                    zw[i] = nz[i]
        elif nbytes % 8:  # the last task: the bytes after the last full word
            b0 = 8 * nwords
            t = _tail_rows(g, nbytes)
            _v1_block(t, 0, 1, n, tie_coin, tie_key, offset + 8 * b0,
                      planes, carry, gt, eq, res, nz)
            _store_tail(res[0], out, b0, nbytes)
            if want_nonzero:
                _store_tail(nz[0], nonzero, b0, nbytes)
    return 0


@jit
def _planes_to_counts(planes, w, cbuf):
    """Bit-sliced counters of w words -> one count per coordinate, cbuf[64 i + m]."""
    nplanes = planes.shape[0]
    if cbuf.itemsize == 1:  # counts < 256: spread eight bits into eight bytes at once
        cw = cbuf.view(np.uint64)
        for j in range(nplanes):
            pb = planes[j, :w].view(np.uint8)  # byte q of the plane = coordinates 8q..8q+7
            sh = np.uint64(j)
            if j == 0:
                for q in range(8 * w):
                    cw[q] = _spread8(pb[q])
            else:
                for q in range(8 * w):
                    cw[q] |= _spread8(pb[q]) << sh
    else:
        for i in range(w):
            for m in range(64):
                c = 0
                for j in range(nplanes):
                    c |= np.int64((planes[j, i] >> np.uint64(m)) & ONE) << j
                cbuf[64 * i + m] = c


@jit
def _vote_tasks(nbytes):
    """Parallel tasks of a count over nbytes per row: one per VOTE_WORDS words, and a
    last one for the bytes after the last whole word."""
    return (nbytes // 8 + VOTE_WORDS - 1) // VOTE_WORDS + 1


@jit
def _task_counts(g, nbytes, blk, planes, carry, cbuf):
    """Task blk (of _vote_tasks(nbytes)) of a count over g[:, :nbytes]: cbuf[k] = the
    count of coordinate i0 + k for k < 64 w.  Returns (i0, w); w = 0: nothing to count
    (the last task when nbytes is a multiple of 8)."""
    nwords = nbytes // 8
    if blk < _vote_tasks(nbytes) - 1:
        w0 = blk * VOTE_WORDS
        w = min(VOTE_WORDS, nwords - w0)
        _count_block(g, 8 * w0, w, planes, carry)
    elif nbytes % 8:
        w0 = nwords
        w = 1
        _count_block(_tail_rows(g, nbytes), 0, 1, planes, carry)
    else:
        return 64 * nwords, 0
    _planes_to_counts(planes, w, cbuf)
    return 64 * w0, w


@pjit
def counts(g, out):
    """Per-coordinate number of rows with bit 1, for gathered packed rows g (n rows,
    at least ceil(d / 8) bytes each); out has length d (uint8/16/32)."""
    d = out.shape[0]
    nbytes = (d + 7) // 8
    nplanes = _nplanes(g.shape[0])
    for blk in numba.prange(_vote_tasks(nbytes)):
        planes = np.empty((nplanes, VOTE_WORDS), np.uint64)
        carry = np.empty(VOTE_WORDS, np.uint64)
        cbuf = np.empty(64 * VOTE_WORDS, out.dtype)
        i0, w = _task_counts(g, nbytes, blk, planes, carry, cbuf)
        m = min(64 * w, d - i0)
        os = out[i0:i0 + m]
        for i in range(m):
            os[i] = cbuf[i]


# ---------------------------------------------------------------------------------------
# decisions from counts (v1 from counts, and S_1 of v2)


@jit
def _s1_up(c, n32, base, k):
    """S_1 (eq. 11) for the count c at the k-th position of a run whose words are
    SplitMix64(k * GOLDEN + base): True with probability c / n, as (u32 * n < c << 32),
    u32 the top 32 bits of the random word, exact in integers.  n32 < 2**31, so the
    product is a 32 x 32 -> 64 bit multiply (it vectorises) and equals the reference's
    int64 arithmetic."""
    z = np.uint64(k) * GOLDEN + base
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    u32 = np.uint32(z >> np.uint64(32))
    return np.uint64(u32) * np.uint64(n32) < (np.uint64(c) << np.uint64(32))


@jit
def _s1_fits_u32(n):
    """True when ``_s1_up``'s 32 x 32 -> 64 bit draw is exact for n ranks (n < 2**31)."""
    return n < (1 << 31)


@jit
def _s1_flags(cs, m, n32, key, pos0, flags):
    """flags[k] = ``_s1_up`` for the counts cs[0:m] at positions pos0 + k."""
    base = np.uint64(pos0) * GOLDEN + GOLDEN + key
    for k in range(m):
        flags[k] = _s1_up(cs[k], n32, base, k)


@jit
def _s1_values(cs, m, n32, key, pos0, out):
    """out[k] = +1.0 where ``_s1_up`` draws 1 for the count cs[k] at position pos0 + k,
    else -1.0 (float32): the draw straight to values, no flags in between."""
    base = np.uint64(pos0) * GOLDEN + GOLDEN + key
    for k in range(m):
        out[k] = np.float32(1.0) if _s1_up(cs[k], n32, base, k) else np.float32(-1.0)


@jit
def _s1_flags_big_n(cs, m, n, key, pos0, flags):
    """_s1_flags for n >= 2**31, in the reference's signed 64-bit arithmetic."""
    nn = np.int64(n)
    for k in range(m):
        u32 = np.int64(_word(key, pos0 + k) >> np.uint64(32))
        flags[k] = u32 * nn < (np.int64(cs[k]) << 32)


@jit
def _s1_flags_n(cs, m, n, key, pos0, flags):
    """_s1_flags, or _s1_flags_big_n for n >= 2**31."""
    if _s1_fits_u32(n):
        _s1_flags(cs, m, np.uint32(n), key, pos0, flags)
    else:
        _s1_flags_big_n(cs, m, n, key, pos0, flags)


@jit
def _v1_flags(cs, m, n, flags):
    """flags[k] bit 0 = (2c > n), bit 1 = (2c == n), for the counts cs[0:m]."""
    nn = np.int64(n)
    for k in range(m):
        c2 = 2 * np.int64(cs[k])
        flags[k] = np.uint8(c2 > nn) | (np.uint8(c2 == nn) << np.uint8(1))


@jit
def _pack_flags(flags, m, out, shift):
    """Pack bit `shift` of flags[0:m] (one coordinate per byte) into out[0:ceil(m/8)],
    padding bits 0."""
    fw = flags.view(np.uint64)
    nfull = m >> 3
    sh = np.uint64(shift)
    for b in range(nfull):
        out[b] = _pack8((fw[b] >> sh) & LANE_ONES)
    if m & 7:
        byte = 0
        for k in range(m & 7):
            byte |= np.int64((flags[8 * nfull + k] >> shift) & 1) << k
        out[nfull] = byte


DECIDE_CHUNK = 1 << 14  # coordinates per parallel task (multiple of 64)
S1_SUB = 1 << 10        # S_1 values per L1 buffer of decide_values (a multiple of 8)
HIGH8 = np.uint64(0x8080808080808080)
LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
MOVEMASK = np.uint64(0x0002040810204081)  # ((x & HIGH8) * MOVEMASK) >> 56: bit 7 of byte k -> bit k


@jit
def _v1_bytes_u8(cs, m, half, gt, tie):
    """v1 of uint8 counts cs[0:m] (all <= 127), eight at a time in one uint64: gt[b] bit k
    = (count 8b+k > half), tie[b] bit k = (count == half); padding bits 0."""
    nfull = m >> 3
    cw = cs[:8 * nfull].view(np.uint64)
    add = (np.uint64(127) - np.uint64(half)) * LANE_ONES    # bit 7 of c + add: c > half
    hh = np.uint64(half) * LANE_ONES
    for b in range(nfull):
        x = cw[b]
        gt[b] = np.uint8((((x + add) & HIGH8) * MOVEMASK) >> np.uint64(56))
        z = x ^ hh                                          # zero bytes: c == half
        y = ~(((z & LOW7) + LOW7) | z | LOW7)
        tie[b] = np.uint8(((y & HIGH8) * MOVEMASK) >> np.uint64(56))
    if m & 7:
        g = 0
        t = 0
        for k in range(m & 7):
            c = np.int64(cs[8 * nfull + k])
            g |= np.int64(c > half) << k
            t |= np.int64(c == half) << k
        gt[nfull] = g
        tie[nfull] = t


@jit
def _decide_chunk(cs, m, n, mode, key, pos0, os, zs, flags, gt, tie):
    """The vote of the counts cs[0:m] (positions pos0 ..) packed into os[0:ceil(m/8)]
    (and, for mode 1, the nonzero mask into zs): ``decide_from_counts``'s rule for one
    chunk of at most DECIDE_CHUNK counts; flags, gt and tie are scratch (DECIDE_CHUNK,
    and DECIDE_CHUNK / 8 bytes)."""
    nb = (m + 7) >> 3
    if mode == 2:
        _s1_flags_n(cs, m, n, key, pos0, flags)
        _pack_flags(flags, m, os, 0)
    elif cs.itemsize == 1 and n < 128:   # uint8 counts: eight per uint64 (the compressors')
        _v1_bytes_u8(cs, m, n // 2, gt, tie)
        if n % 2:
            for b in range(nb):
                tie[b] = 0                # odd n never ties: 2c == n has no solution
        if mode == 0:
            gw = gt.view(np.uint64)
            for b in range(nb, (nb + 7) & ~7):   # whole words for _tie_coins
                gt[b] = 0
                tie[b] = 0
            _tie_coins(gw, tie.view(np.uint64), (nb + 7) >> 3, key, pos0, gw)
            for b in range(nb):
                os[b] = gt[b]
        else:
            for b in range(nb):
                os[b] = gt[b]
                zs[b] = ~tie[b]
    else:
        _v1_flags(cs, m, n, flags)
        if mode == 0:  # o = gt, or a coin of the shared stream where tied
            for b in range(nb, (nb + 7) & ~7):
                gt[b] = 0
                tie[b] = 0
            _pack_flags(flags, m, gt, 0)
            _pack_flags(flags, m, tie, 1)
            gw = gt.view(np.uint64)
            _tie_coins(gw, tie.view(np.uint64), (nb + 7) >> 3, key, pos0, gw)
            for b in range(nb):
                os[b] = gt[b]
        else:
            _pack_flags(flags, m, os, 0)
            _pack_flags(flags, m, zs, 1)
            for b in range(nb):
                zs[b] = ~zs[b]


@pjit
def decide_from_counts(c, n, mode, key, offset, out, nonzero):
    """Packed vote from counts c (length d).  mode 0: v1 with tie coin, 1: v1 with tie
    zero (nonzero gets the mask), 2: v2, S_1 (eq. 11): bit 1 with probability c / n,
    decided exactly in integers as (u32 * n) < (c << 32), u32 the top 32 random bits.
    Parallel over chunks."""
    for ch in numba.prange((c.shape[0] + DECIDE_CHUNK - 1) // DECIDE_CHUNK):
        _decide_counts_chunk(ch, c, n, mode, key, offset, out, nonzero)
    return 0


@jit
def decide_from_counts_serial(c, n, mode, key, offset, out, nonzero):
    """``decide_from_counts`` on the calling thread (small inputs: no thread-pool
    wake-up)."""
    for ch in range((c.shape[0] + DECIDE_CHUNK - 1) // DECIDE_CHUNK):
        _decide_counts_chunk(ch, c, n, mode, key, offset, out, nonzero)
    return 0


@jit
def _decide_counts_chunk(ch, c, n, mode, key, offset, out, nonzero):
    """Counts ch*DECIDE_CHUNK .. of ``decide_from_counts``."""
    i0 = ch * DECIDE_CHUNK
    m = min(DECIDE_CHUNK, c.shape[0] - i0)
    nb = (m + 7) >> 3
    flags = np.empty(DECIDE_CHUNK, np.uint8)
    gt = np.empty(DECIDE_CHUNK >> 3, np.uint8)
    tie = np.empty(DECIDE_CHUNK >> 3, np.uint8)
    zs = nonzero[i0 >> 3:(i0 >> 3) + nb] if mode == 1 else nonzero
    _decide_chunk(c[i0:i0 + m], m, n, mode, key, offset + i0, out[i0 >> 3:(i0 >> 3) + nb],
                  zs, flags, gt, tie)


@jit
def _decide_values_chunk(ch, c, n, mode, key, offset, out, stream):
    """Counts ch*DECIDE_CHUNK .. of ``decide_values``."""
    d = c.shape[0]
    has_nonzero = mode == 1 and n % 2 == 0
    i0 = ch * DECIDE_CHUNK
    m = min(DECIDE_CHUNK, d - i0)
    os = out[i0:i0 + m]
    if mode == 2 and _s1_fits_u32(n):   # S_1 straight to values
        if not stream:
            _s1_values(c[i0:i0 + m], m, np.uint32(n), key, offset + i0, os)
            return
        vbuf = np.empty(S1_SUB, np.float32)
        for s0 in range(0, m, S1_SUB):
            k = min(S1_SUB, m - s0)
            _s1_values(c[i0 + s0:i0 + s0 + k], k, np.uint32(n), key, offset + i0 + s0,
                       vbuf)
            for b in range(k >> 3):   # s0 is a multiple of S1_SUB: aligned
                _stream8(os, s0 + 8 * b, vbuf, 8 * b)
            for i in range(k & ~7, k):
                os[s0 + i] = vbuf[i]
        _store_fence()
        return
    flags = np.empty(DECIDE_CHUNK, np.uint8)
    bits = np.empty(DECIDE_CHUNK >> 3, np.uint8)
    if mode == 2:
        _s1_flags_big_n(c[i0:i0 + m], m, n, key, offset + i0, flags)
        if not stream:
            for k in range(m):
                os[k] = np.float32(2 * np.int32(flags[k]) - 1)
            return
        _pack_flags(flags, m, bits, 0)
    else:
        gt = np.empty(DECIDE_CHUNK >> 3, np.uint8)
        tie = np.empty(DECIDE_CHUNK >> 3, np.uint8)
        nz = np.empty(DECIDE_CHUNK >> 3, np.uint8)
        _decide_chunk(c[i0:i0 + m], m, n, mode, key, offset + i0, bits, nz, flags, gt,
                      tie)
        if not stream or has_nonzero:
            _values(bits, nz, has_nonzero, m, os)
            return
    for b in range(m >> 3):   # chunks start at multiples of 64 values: aligned
        _stream8(os, 8 * b, VALUES_FLAT, 8 * np.int64(bits[b]))
    for i in range(m & ~7, m):
        os[i] = VALUES[bits[i >> 3], i & 7]
    _store_fence()


@pjit
def decide_values(c, n, mode, key, offset, out, stream):
    """``decide_from_counts`` and ``vote_values`` in one pass: out[i] = the vote of
    count c[i] as +1.0 / -1.0 (+-0.0 for a tie under mode 1), float32.  Each chunk's
    packed vote stays in a small buffer (``_decide_chunk``, ``_values``): the same
    values as the two kernels one after the other, without the d / 8 packed bytes.
    ``stream`` (out 32-byte aligned; for outputs larger than the caches): the values go
    out with non-temporal stores, eight from a ``VALUES`` row at a time (a plain store
    first reads the line it writes: half the memory traffic of this pass).  S_1 (mode
    2, n < 2**31) writes its values straight from the draw: into ``out``, or into an
    L1 buffer of S1_SUB values that is then streamed out (0.81 -> 0.68 ns per value
    against flags, packing and ``VALUES`` rows).  Parallel over chunks
    (``decide_values_serial``: the same on the calling thread)."""
    for ch in numba.prange((c.shape[0] + DECIDE_CHUNK - 1) // DECIDE_CHUNK):
        _decide_values_chunk(ch, c, n, mode, key, offset, out, stream)
    return 0


@jit
def decide_values_serial(c, n, mode, key, offset, out, stream):
    """``decide_values`` on the calling thread (small inputs: no thread-pool wake-up)."""
    for ch in range((c.shape[0] + DECIDE_CHUNK - 1) // DECIDE_CHUNK):
        _decide_values_chunk(ch, c, n, mode, key, offset, out, stream)
    return 0


@pjit
def vote_s1(g, nbytes, d, key, offset, out):
    """v2 (eq. 11) fused: counts of g[:, :nbytes] per coordinate, then S_1 exactly as
    decide_from_counts mode 2, without writing the d counts to memory.  Needs n < 256."""
    n = g.shape[0]
    nplanes = _nplanes(n)
    for blk in numba.prange(_vote_tasks(nbytes)):
        planes = np.empty((nplanes, VOTE_WORDS), np.uint64)
        carry = np.empty(VOTE_WORDS, np.uint64)
        cbuf = np.empty(64 * VOTE_WORDS, np.uint8)
        flags = np.zeros(64 * VOTE_WORDS, np.uint8)
        i0, w = _task_counts(g, nbytes, blk, planes, carry, cbuf)
        if w == 0:
            continue
        m = min(64 * w, d - i0)
        _s1_flags(cbuf, m, np.uint32(n), key, offset + i0, flags)
        _pack_flags(flags, m, out[i0 >> 3:], 0)
    return 0


# VALUES[v, k] = +1.0 / -1.0 for bit k of the byte v; ONES_OF[v, k] = bit k as 1.0 / 0.0
VALUES = np.array([[2 * ((v >> k) & 1) - 1 for k in range(8)] for v in range(256)], np.float32)
ONES_OF = np.array([[(v >> k) & 1 for k in range(8)] for v in range(256)], np.float32)
VALUES_FLAT = VALUES.reshape(-1)
STREAM_MIN = 1 << 20   # decide_values streams its output from this many values (4 MiB)


@jit
def _values(bits, nonzero, has_nonzero, d, out):
    """``vote_values`` on the calling thread."""
    nfull = d >> 3
    for b in range(nfull):
        row = VALUES[bits[b]]
        if has_nonzero:
            z = ONES_OF[nonzero[b]]
            for k in range(8):
                out[8 * b + k] = row[k] * z[k]
        else:
            for k in range(8):
                out[8 * b + k] = row[k]
    for i in range(8 * nfull, d):
        v = np.float32(2 * ((bits[i >> 3] >> (i & 7)) & 1) - 1)
        if has_nonzero:
            v *= np.float32((nonzero[i >> 3] >> (i & 7)) & 1)
        out[i] = v


@jit
def vote_values(bits, nonzero, has_nonzero, d, out):
    """Packed vote bits (1 = +1, 0 = -1) -> out[i] = +1.0 / -1.0, times the bit of the
    packed ``nonzero`` mask when there is one (+-0.0 for a tie under the "zero" rule,
    the signs torch's decoded floats have).  ``out`` is float32; one pass, eight values
    per byte from a 256-entry table (8 KiB)."""
    _values(bits, nonzero, has_nonzero, d, out)


# ---------------------------------------------------------------------------------------
# count fields for the packed-count allreduce


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
