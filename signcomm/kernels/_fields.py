"""numba kernels of the count-field words (``fields.py`` is the codec), and the counts
hash of the compressors' shared keys.  Each kernel has a plain NumPy twin
(``*_reference``) that states the same layout in array operations; the tests keep them
identical.

Layouts: coordinate ``i`` is field ``i % F`` of word ``i // F``, and field ``j`` is digit
``j`` of the word's integer value in base ``B``: ``word = sum_j c_j * B**j``.  Binary
layouts have ``B = 2**b`` (field ``j`` at bits ``j*b .. j*b + b - 1``); radix layouts have
``B = n + 1``, the fewest bits that still let a sum of n words add every digit without a
carry.  The words are stored as int64, or exactly as float64 (then ``B**F <= 2**(50 - b)``
keeps any sum of n such words, and any scaled sum, below 2**53).

Speed notes (``benchmarks/compressor_bench.py --profile`` measures them against a copy):

- encode reads the packed bits as a stream, eight coordinates at a time, and turns each
  byte into its digits with one table lookup and one multiply (``table[byte] * B**(8t)``);
- decode of binary fields spreads eight b-bit fields into eight bytes with one ``pdep``
  (BMI2) and one 8-byte store; radix words are split into groups of k digits with a
  float64 multiply by ``1 / B**k`` (exact after one correction, every value is below
  2**53) and a table lookup that yields k count bytes at once;
- a float64 word becomes its exact integer in vectorised passes; the largest rounding
  distance is an integer max over the distances' bit patterns (a float max with NaN
  rules stays scalar: 0.06-0.13 ns per coordinate more at n = 2-8);
- both run over chunks of words in parallel; a chunk's last word is stored byte by byte
  so no 8-byte store crosses into another thread's counts.
"""
from __future__ import annotations

import numba
import numpy as np

from ._cpu import _host_has, _wide_vectors
from .bits import BITORDER, packed_nbytes

jit = numba.njit(cache=True, nogil=True)


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


@jit
def _mix_word(u, i):
    """SplitMix64(u + (i + 1) * GOLDEN): the term of word i in ``mix_sum``."""
    z = u + np.uint64(i + 1) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@jit
def mix_sum(words, i0):
    """sum over i of SplitMix64(words[i] + (i0 + i + 1) * GOLDEN), mod 2**64 (uint64):
    the body of ``wire.counts_hash`` (i0 = 0 for a whole tensor's counts; a message's
    counts start at word i0 of its tensor's), one multiply-xorshift chain per 8 count
    bytes."""
    h = np.uint64(0)
    for i in range(words.shape[0]):
        h += _mix_word(words[i], i0 + i)
    return h


# ---------------------------------------------------------------------------------------
# Fast codec: any base B (binary B = 2**b, radix B = n + 1), int64 or float64 words

from numba import types as _nbtypes  # noqa: E402
from numba.core import cgutils as _cgutils  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402

pjit = numba.njit(cache=True, nogil=True, parallel=True)

ONES8 = np.uint64(0x0101010101010101)
HIGH8 = np.uint64(0x8080808080808080)
EVEN16 = np.uint64(0x00FF00FF00FF00FF)
WORD_CHUNK = 1 << 12     # words per parallel task (a multiple of 8: a chunk's counts
                         # start on a whole 8-byte word, so chunks hash whole words)
TASKS = 16               # the encode and the radix decode: at most this many ranges of
                         # words (each at least WORD_CHUNK): a range's set-up costs
                         # microseconds, and 16 balance up to 16 threads


@jit
def _range_size(nwords):
    """Words per parallel range of ``encode_words`` / ``decode_radix8``: a multiple of 8,
    at least WORD_CHUNK, at most TASKS ranges."""
    return max(WORD_CHUNK, ((nwords + TASKS - 1) // TASKS + 7) & ~7)


INF_BITS = np.int64(0x7FF0000000000000)   # float64 inf's bit pattern
HAVE_PDEP = _host_has("bmi2")   # else the portable decode runs


@_intrinsic
def _pdep64(typingctx, src, mask):
    """BMI2 ``pdep``: deposit the low bits of src at the set bits of mask."""
    sig = _nbtypes.uint64(_nbtypes.uint64, _nbtypes.uint64)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        fn = _cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.bmi.pdep.64")
        return builder.call(fn, args)

    return sig, codegen


@_intrinsic
def _store_u64(typingctx, arr, idx, val):
    """Store the uint64 val at byte idx of the uint8 array arr (unaligned, unchecked)."""
    sig = _nbtypes.void(arr, _nbtypes.intp, _nbtypes.uint64)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        builder.store(args[2], ptr).align = 1
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _load_u64(typingctx, arr, idx):
    """The uint64 at byte idx of the uint8 array arr (unaligned, unchecked)."""
    sig = _nbtypes.uint64(arr, _nbtypes.intp)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        val = builder.load(ptr)
        val.align = 1
        return val

    return sig, codegen


@_intrinsic
def _ctpop64(typingctx, x):
    """Number of 1 bits of a uint64 (one ``popcnt``)."""
    sig = _nbtypes.uint64(_nbtypes.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


def digit_table(base: int):
    """T[v] for a byte v: sum over its bits k of bit_k * base**k (int64).  For
    ``base = 2**b``: bit k moved to bit k*b."""
    base = int(base)
    return np.array([sum(((v >> k) & 1) * base ** k for k in range(8)) if base ** 7 < 2 ** 63
                     else sum(((v >> k) & 1) * base ** k for k in range(8) if base ** k < 2 ** 63)
                     for v in range(256)], np.int64)


def byte_powers(base: int, f: int):
    """base**(8t) for the ceil(f / 8) byte groups of a word (int64)."""
    return np.array([int(base) ** (8 * t) for t in range(-(-int(f) // 8))], np.int64)


def group_table(base: int, k: int):
    """DT[v] for v < base**k: the k base-``base`` digits of v, digit j in byte j (uint64)."""
    g = int(base) ** int(k)
    v = np.arange(g, dtype=np.int64)
    out = np.zeros(g, np.uint64)
    for j in range(int(k)):
        out |= ((v % base).astype(np.uint64)) << np.uint64(8 * j)
        v //= base
    return out


@jit
def _encode_loaded(packed, f, table, powers, out, w0, w1):
    """Words w0 .. w1 - 1 of ``encode_words``, each word's f bits (f <= 56) from one
    unaligned 8-byte load of the packed bytes (the caller keeps the loads inside
    ``packed``); returns their popcount."""
    _wide_vectors()
    ngroups = powers.shape[0]
    mask = (np.uint64(1) << np.uint64(f)) - np.uint64(1)
    pop = 0
    for w in range(w0, w1):
        s = w * f
        bits = (_load_u64(packed, s >> 3) >> np.uint64(s & 7)) & mask
        pop += np.int64(_ctpop64(bits))
        acc = np.int64(0)
        for t in range(ngroups):
            acc += table[np.int64((bits >> np.uint64(8 * t)) & np.uint64(0xFF))] * powers[t]
        out[w] = acc
    return pop


@jit
def _encode_streamed(packed, d, f, table, powers, out, w0, w1):
    """Words w0 .. w1 - 1 of ``encode_words`` from the packed bits read as a stream, at
    most 8 at a time (the words too close to the end for an 8-byte load, and f > 56: 63
    one-bit fields); returns their popcount."""
    nbytes = (d + 7) >> 3
    ngroups = powers.shape[0]
    pop = 0
    s = w0 * f
    nxt = s >> 3
    buf = np.uint64(0)   # the next nbuf bits of the stream, low bit first
    nbuf = 0
    if s & 7:
        buf = np.uint64(packed[nxt]) >> np.uint64(s & 7)
        nbuf = 8 - (s & 7)
        nxt += 1
    for w in range(w0, w1):
        m = min(f, d - w * f)
        acc = np.int64(0)
        for t in range(ngroups):
            k = min(8, m - 8 * t)
            if k <= 0:
                break
            if nbuf < k:
                if nxt < nbytes:
                    buf |= np.uint64(packed[nxt]) << np.uint64(nbuf)
                    nxt += 1
                nbuf += 8
            byte = buf & ((np.uint64(1) << np.uint64(k)) - np.uint64(1))
            buf >>= np.uint64(k)
            nbuf -= k
            pop += np.int64(_ctpop64(byte))
            acc += table[np.int64(byte)] * powers[t]
        out[w] = acc
    return pop


@jit
def _encode_range(packed, d, f, table, powers, out, w0, w1):
    """Words w0 .. w1 - 1 of ``encode_words``: 8-byte loads where they stay inside the
    packed bytes, the stream after; returns their popcount."""
    _wide_vectors()   # (also here: LLVM may inline _encode_loaded's loop into this one)
    nbytes = (d + 7) >> 3
    wfast = w0
    pop = 0
    if f <= 56:
        # words whose 8-byte load stays inside packed and that hold f full coordinates
        last = min(w1, (nbytes - 8) * 8 // f if nbytes >= 8 else 0, d // f)
        if last > w0:
            pop += _encode_loaded(packed, f, table, powers, out, w0, last)
            wfast = last
    if wfast < w1:
        pop += _encode_streamed(packed, d, f, table, powers, out, wfast, w1)
    return pop


@pjit
def encode_words(packed, d, f, table, powers, out):
    """Packed bits (kernels' convention) of d coordinates -> ``out[w]`` = sum over the
    coordinates i = w*f + j of bit_i * B**j, as ``sum_t table[byte_t] * powers[t]`` with
    byte_t the bits of coordinates w*f + 8t .. w*f + 8t + 7 (``digit_table``,
    ``byte_powers``).  ``out`` is int64 or float64 (exact: every word < 2**53 there).
    Returns the number of 1 bits.  Parallel over ranges of words (``_range_size``)."""
    nwords = out.shape[0]
    size = _range_size(nwords)
    nchunks = (nwords + size - 1) // size
    pops = np.zeros(nchunks, np.int64)
    for c in numba.prange(nchunks):
        pops[c] = _encode_range(packed, d, f, table, powers, out, c * size,
                                min(nwords, (c + 1) * size))
    return pops.sum()


@jit
def encode_words_serial(packed, d, f, table, powers, out):
    """``encode_words`` on the calling thread (small tensors: no thread-pool wake-up),
    in one range: a call per chunk of words cost 15-20 % more at 25.6M coordinates."""
    return _encode_range(packed, d, f, table, powers, out, 0, out.shape[0])


@jit
def _word_int(words, w, inv_scale, is_float, limit, vmax):
    """Word w as an exact integer: (value, distance of the scaled float from it, ok).
    ok is False for a value outside [0, limit) (float64 words; or NaN) or [0, vmax]
    (int64 words)."""
    if is_float:
        x = np.float64(words[w]) * inv_scale
        r = np.rint(x)
        dev = abs(x - r)
        if not (r >= 0.0 and r < limit):
            return np.int64(0), (dev if dev == dev else np.inf), False
        return np.int64(r), dev, True
    v = np.int64(words[w])
    return v, 0.0, v >= 0 and v <= vmax


@jit
def _store8(out, p, x, limit):
    """Bytes of x (little-endian) to out[p:p+8], those at or past limit dropped."""
    if p + 8 <= limit:
        _store_u64(out, p, x)
    else:
        for j in range(limit - p):
            out[p + j] = np.uint8((x >> np.uint64(8 * j)) & np.uint64(0xFF))


@jit
def _exact_words(words, w0, nb, inv_scale, is_float, limit, vmax, v_out):
    """Words w0 .. w0 + nb - 1 as exact integers into v_out (vectorisable passes):
    (max distance of a scaled float64 word from its integer, inf if one is NaN; number of
    words outside [0, limit) or [0, vmax], NaN included; those decode as 0).  The
    distances go through v_out first, as float64, and their max is taken on their bit
    patterns (an integer max vectorises; a float one with NaN rules does not; a
    non-negative float's pattern orders like the float, and NaN's lies above inf's)."""
    _wide_vectors()
    mdev = 0.0
    bad = 0
    ws = words[w0:w0 + nb]
    vs = v_out[:nb]
    if is_float:
        devs = vs.view(np.float64)
        for i in range(nb):
            x = np.float64(ws[i]) * inv_scale
            devs[i] = abs(x - np.rint(x))
        top = np.int64(0)
        for i in range(nb):
            top = max(top, vs[i])
        if top > INF_BITS:
            mdev = np.inf
        elif top > 0:
            vs[0] = top
            mdev = devs[0]
        for i in range(nb):
            r = np.rint(np.float64(ws[i]) * inv_scale)
            ok = (r >= 0.0) & (r < limit)
            bad += np.int64(not ok)
            vs[i] = np.int64(r if ok else 0.0)
    else:
        for i in range(nb):
            v = np.int64(ws[i])
            ok = (v >= 0) & (v <= vmax)
            bad += np.int64(not ok)
            vs[i] = v if ok else 0
    return mdev, bad


@jit
def _binary8_chunk(c, words, inv_scale, is_float, limit, vmax, d, b, f, n, counts):
    """Words c*WORD_CHUNK .. of ``decode_binary8``: (max dev, bad)."""
    nwords = words.shape[0]
    fmask = np.uint64((1 << b) - 1)
    dep = fmask * ONES8                       # the low b bits of every byte
    gbits = 8 * b
    gmask = (np.uint64(1) << np.uint64(gbits)) - np.uint64(1)
    over = (np.uint64(0x80) - np.uint64(n + 1)) * ONES8   # byte + over has bit 7 iff > n
    ngroups = (f + 7) >> 3
    w0 = c * WORD_CHUNK
    w1 = min(nwords, w0 + WORD_CHUNK)
    lim = min(d, w1 * f)
    vals = np.empty(w1 - w0, np.int64)
    mdev, bad = _exact_words(words, w0, w1 - w0, inv_scale, is_float, limit, vmax, vals)
    flagged = np.uint64(0)
    top = np.uint64(f * b)
    for i in range(w1 - w0):
        w = w0 + i
        u = np.uint64(vals[i])
        p = w * f
        if p + 8 * ngroups <= lim:   # a whole word whose 8-byte stores stay before lim
            bad += (u >> top) != 0
            for g in range(ngroups):
                x = _pdep64((u >> np.uint64(g * gbits)) & gmask, dep)
                flagged |= x + over
                _store_u64(counts, p + 8 * g, x)
        else:
            m = min(f, d - p)
            bad += (u >> np.uint64(m * b)) != 0
            for g in range(ngroups):
                x = _pdep64((u >> np.uint64(g * gbits)) & gmask, dep)
                flagged |= x + over
                _store8(counts, p + 8 * g, x, lim)
    bad += (flagged & HIGH8) != 0
    return mdev, bad


@pjit
def decode_binary8(words, inv_scale, is_float, limit, vmax, d, b, f, n, counts):
    """Summed binary-field words (field j at bits j*b, b <= 7) -> uint8 counts, eight
    fields per ``pdep``.  float64 words are scaled by inv_scale and rounded.  Returns
    (max distance of a scaled word from its integer, number of bad words: a value
    outside [0, limit) or [0, vmax], bits above the word's last field; plus one per
    chunk with a field > n).  The total of the counts is ``byte_total``'s.  Parallel
    over chunks of words."""
    nchunks = (words.shape[0] + WORD_CHUNK - 1) // WORD_CHUNK
    devs = np.zeros(nchunks, np.float64)
    bads = np.zeros(nchunks, np.int64)
    for c in numba.prange(nchunks):
        devs[c], bads[c] = _binary8_chunk(c, words, inv_scale, is_float, limit, vmax, d, b,
                                          f, n, counts)
    return (devs.max() if nchunks else 0.0), bads.sum()


@jit
def decode_binary8_serial(words, inv_scale, is_float, limit, vmax, d, b, f, n, counts):
    """``decode_binary8`` on the calling thread."""
    mdev, bad = 0.0, 0
    for c in range((words.shape[0] + WORD_CHUNK - 1) // WORD_CHUNK):
        dv, bd = _binary8_chunk(c, words, inv_scale, is_float, limit, vmax, d, b, f, n, counts)
        mdev, bad = (dv if not dv <= mdev else mdev), bad + bd
    return mdev, bad


@jit
def decode_fields_any(words, inv_scale, is_float, limit, vmax, d, b, f, n, counts):
    """The portable decode of binary fields (any b, any counts dtype), one field at a
    time, on the calling thread; same returns as ``decode_binary8``."""
    mask = np.uint64((1 << b) - 1) if b < 64 else ~np.uint64(0)
    mdev = 0.0
    tot = 0
    bad = 0
    for w in range(words.shape[0]):
        v, dev, ok = _word_int(words, w, inv_scale, is_float, limit, vmax)
        mdev = max(mdev, dev)
        bad += not ok
        u = np.uint64(v)
        i0 = w * f
        m = min(f, d - i0)
        for j in range(m):
            cj = (u >> np.uint64(j * b)) & mask
            bad += cj > np.uint64(n)
            counts[i0 + j] = cj
            tot += np.int64(cj)
        if m * b < 64 and (u >> np.uint64(m * b)) != 0:
            bad += 1
    return mdev, tot, bad


@jit
def _radix_consts(base, f, k):
    """(gpow, inv_gpow, h, B**h, 1 / B**h) of ``decode_radix8``."""
    gsize = np.int64(1)
    for _ in range(k):
        gsize *= base
    ngmax = (f + k - 1) // k + 1
    gpow = np.ones(ngmax + 1, np.int64)
    inv_gpow = np.ones(ngmax + 1, np.float64)
    for g in range(1, ngmax + 1):
        if np.float64(gpow[g - 1]) * np.float64(gsize) < 4.0e18:
            gpow[g] = gpow[g - 1] * gsize
        else:   # beyond any part (< 2**53): its quotient is 0
            gpow[g] = np.int64(1) << 62
        inv_gpow[g] = 1.0 / np.float64(gpow[g])
    h = f // 2     # int64 words: split once by B**h (>= 2**11), both parts < 2**53
    bh = np.int64(1)
    for _ in range(h):
        bh *= base
    return gpow, inv_gpow, h, bh, 1.0 / np.float64(bh)


RADIX_BLOCK = 256   # words per block of _radix8_chunk (its quotients stay in L1; a
                    # multiple of 8, so blocks too start on whole count words)


@jit
def _radix_tail(q0, q1, i, p, m, pd, h, k, gsize, is_float, table, counts, lim):
    """The stores of one word near the end of a chunk (m digits; none past lim);
    returns what is left of its parts (0 for a valid word)."""
    n0 = min(m, pd)
    qcur = q0[0, i]
    for g in range((n0 + k - 1) // k):
        qn = q0[g + 1, i]
        _store8(counts, p + g * k, table[qcur - qn * gsize], lim)
        qcur = qn
    left = qcur
    if not is_float:
        qcur = q1[0, i]
        for g in range((m - n0 + k - 1) // k):
            qn = q1[g + 1, i]
            _store8(counts, p + h + g * k, table[qcur - qn * gsize], lim)
            qcur = qn
        left |= qcur
    return left


@jit
def _quotients(q, ng, nb, gpow, inv_gpow):
    """q[g, i] = floor(q[0, i] / gpow[g]) for g = 1..ng and i < nb (every q[0, i] below
    2**53): a float64 multiply by 1 / gpow[g], then one correction; across words, so it
    vectorises."""
    _wide_vectors()
    src = q[0]
    for g in range(1, ng + 1):
        gp = gpow[g]
        ig = inv_gpow[g]
        dst = q[g]
        for i in range(nb):
            v = src[i]
            qn = np.int64(np.float64(v) * ig)
            r = v - qn * gp
            dst[i] = qn + np.int64(r >= gp) - np.int64(r < 0)


@jit
def _total_mix(counts, a, e, w, mix_base):
    """The counts of bytes [a, e) summed, and ``mix_sum``'s terms of the whole 8-byte
    words of counts from word w on that end at or before e (word i keyed as word
    mix_base + i of ``mix_sum``).  Returns (total, mix, next word)."""
    _wide_vectors()
    tot = 0
    cs = counts[a:e]
    for i in range(e - a):
        tot += np.int64(cs[i])
    mix = np.uint64(0)
    w1 = max(w, e >> 3)
    for i in range(w, w1):
        mix += _mix_word(_load_u64(counts, 8 * i), mix_base + i)
    return tot, mix, w1


@jit
def _radix8_range(w0c, w1c, words, inv_scale, is_float, limit, vmax, d, f, k, table, counts,
                  gpow, inv_gpow, h, bh, inv_bh, mix_base):
    """Words w0c .. w1c - 1 of ``decode_radix8``: (max dev, bad, total of the counts,
    ``mix_sum`` terms of the whole count words inside the chunk's bytes).

    Per block of RADIX_BLOCK words, two passes.  The first (vectorisable, across words)
    makes each word an exact integer v and the quotients q_g = floor(v / gpow[g]) of
    every group g: a float64 multiply by 1 / gpow[g], exact after one correction since
    v < 2**53 (an int64 word is first split by B**h the same way into two parts below
    2**53).  The second looks group g = q_g - B**k q_(g+1) up in ``table`` (k count bytes
    at once) and stores it; the block's counts, still in L1, are then summed and hashed
    (``_total_mix``)."""
    _wide_vectors()
    lim = min(d, w1c * f)
    gsize = gpow[1]
    pd = f if is_float else h            # digits of the first part
    ng0 = (pd + k - 1) // k
    ng1 = 0 if is_float else (f - h + k - 1) // k
    q0 = np.empty((ng0 + 1, RADIX_BLOCK), np.int64)     # quotients of the first part
    q1 = np.empty((ng1 + 1, RADIX_BLOCK), np.int64)     # ... and of the second
    vals = np.empty(RADIX_BLOCK, np.int64)
    mdev = 0.0
    bad = 0
    tot = 0
    mix = np.uint64(0)
    done = min(lim, w0c * f)         # counts bytes before it are summed
    wmix = (done + 7) >> 3           # the next count word to hash
    for w0 in range(w0c, w1c, RADIX_BLOCK):
        nb = min(RADIX_BLOCK, w1c - w0)
        dv, bd = _exact_words(words, w0, nb, inv_scale, is_float, limit, vmax, vals)
        mdev = dv if not dv <= mdev else mdev
        bad += bd
        if is_float:
            for i in range(nb):
                q0[0, i] = vals[i]
        else:
            for i in range(nb):
                v = vals[i]
                hi = np.int64(np.float64(v) * inv_bh)   # off by at most one
                lo = v - hi * bh
                adj = np.int64(lo >= bh) - np.int64(lo < 0)
                q0[0, i] = lo - adj * bh
                q1[0, i] = hi + adj
        _quotients(q0, ng0, nb, gpow, inv_gpow)
        _quotients(q1, ng1, nb, gpow, inv_gpow)
        for i in range(nb):
            p = (w0 + i) * f
            if p + f + 8 <= lim:   # a whole word, its 8-byte stores stay before lim
                qcur = q0[0, i]
                for g in range(ng0):
                    qn = q0[g + 1, i]
                    _store_u64(counts, p + g * k, table[qcur - qn * gsize])
                    qcur = qn
                left = qcur
                if not is_float:
                    qcur = q1[0, i]
                    for g in range(ng1):
                        qn = q1[g + 1, i]
                        _store_u64(counts, p + h + g * k, table[qcur - qn * gsize])
                        qcur = qn
                    left |= qcur
            else:
                left = _radix_tail(q0, q1, i, p, min(f, d - p), pd, h, k, gsize, is_float,
                                   table, counts, lim)
            bad += left != 0
        end = min(lim, (w0 + nb) * f)   # the block's counts are final up to here
        t, mx, wmix = _total_mix(counts, done, end, wmix, mix_base)
        tot += t
        mix += mx
        done = end
    return mdev, bad, tot, mix


@pjit
def decode_radix8(words, inv_scale, is_float, limit, vmax, d, base, f, k, table, counts,
                  mix_base):
    """Summed radix words (digit j of the word in base ``base``) -> uint8 counts, k
    digits per table lookup.  float64 words are below 2**53 and split with float64
    arithmetic; int64 words (up to 2**63) are first split once by base**(f // 2)
    (float64 estimate, one correction).  Returns (max distance of a scaled word from its
    integer, number of bad words: a value outside [0, limit) or [0, vmax], or at least
    base**m for a word of m digits; the total of the counts; the ``mix_sum`` of the
    d // 8 whole 8-byte words of counts, word i keyed as word mix_base + i), the total
    and the hash taken while each block's counts are in L1.  Parallel over ranges of
    words (``_range_size``)."""
    gpow, inv_gpow, h, bh, inv_bh = _radix_consts(base, f, k)
    nwords = words.shape[0]
    size = _range_size(nwords)
    nchunks = (nwords + size - 1) // size
    devs = np.zeros(nchunks, np.float64)
    bads = np.zeros(nchunks, np.int64)
    tots = np.zeros(nchunks, np.int64)
    mixes = np.zeros(nchunks, np.uint64)
    for c in numba.prange(nchunks):
        devs[c], bads[c], tots[c], mixes[c] = _radix8_range(
            c * size, min(nwords, (c + 1) * size), words, inv_scale, is_float, limit, vmax, d,
            f, k, table, counts, gpow, inv_gpow, h, bh, inv_bh, mix_base)
    mix = np.uint64(0)
    for c in range(nchunks):
        mix += mixes[c]
    return (devs.max() if nchunks else 0.0), bads.sum(), tots.sum(), mix


@jit
def decode_radix8_serial(words, inv_scale, is_float, limit, vmax, d, base, f, k, table,
                         counts, mix_base):
    """``decode_radix8`` on the calling thread, in one range of words."""
    gpow, inv_gpow, h, bh, inv_bh = _radix_consts(base, f, k)
    return _radix8_range(0, words.shape[0], words, inv_scale, is_float, limit, vmax, d, f, k,
                         table, counts, gpow, inv_gpow, h, bh, inv_bh, mix_base)


@jit
def byte_total(counts):
    """Sum of a uint8 array, eight bytes per uint64 with 16-bit lanes (vectorises)."""
    nbytes = counts.shape[0]
    nw = nbytes >> 3
    words = counts[:8 * nw].view(np.uint64)
    tot = 0
    for s0 in range(0, nw, 128):         # 128 words: a 16-bit lane holds <= 2 * 128 * 255
        acc = np.uint64(0)
        for i in range(s0, min(nw, s0 + 128)):
            x = words[i]
            acc += (x & EVEN16) + ((x >> np.uint64(8)) & EVEN16)
        lane = np.uint64(0xFFFF)
        tot += np.int64((acc & lane) + ((acc >> np.uint64(16)) & lane) +
                        ((acc >> np.uint64(32)) & lane) + (acc >> np.uint64(48)))
    for i in range(8 * nw, nbytes):
        tot += np.int64(counts[i])
    return tot


def encode_words_reference(packed, d, base, f):
    """NumPy twin of ``encode_words``: (words as Python ints in an object array, popcount)."""
    nwords = -(-d // f) if d else 0
    bits = np.unpackbits(packed[:packed_nbytes(d)], bitorder=BITORDER)[:d].astype(np.int64)
    bits = np.concatenate([bits, np.zeros(nwords * f - d, np.int64)]).reshape(nwords, f)
    powers = [int(base) ** j for j in range(f)]
    words = [sum(int(x) * p for x, p in zip(row, powers)) for row in bits]
    return words, int(bits.sum())


def decode_words_reference(ints, d, base, f):
    """NumPy twin of the decodes for exact integer words: counts (int64)."""
    out = np.zeros(len(ints) * f, np.int64)
    for w, v in enumerate(ints):
        v = int(v)
        for j in range(f):
            v, out[w * f + j] = divmod(v, int(base))
    return out[:d]
