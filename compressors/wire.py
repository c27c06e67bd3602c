"""The compressors' wire format: count fields that any Sum or Average allreduce adds exactly.

Each rank turns its d one-bit contributions (kernels' bit convention) into one or more
*messages*.  A message is a 1-D array of header words followed by ``ceil(m / F)`` data
words for the message's m coordinates; coordinate i of the message is digit ``i % F``
of data word ``i // F`` (``signcomm.kernels.fields``), a digit that holds this rank's bit.
Summing the messages of the n ranks sums every digit separately (a digit's sum is a count
0..n, below the base, so it never carries into the next one): the summed data words hold
the per-coordinate counts c, exactly.

Four wires (``WIRES``), two word types times two digit layouts:

- ``"float64"``: binary fields of ``b = ceil(log2(n + 1))`` bits, ``F = (50 - b) // b`` per
  float64 word, so every word and every sum of n words is an integer below
  ``2**(50 - b)``.  An allreduce that scales (``op=Average`` divides by n;
  ``gradient_predivide_factor`` multiplies by 1/f before and f after) keeps the sum within
  a relative error of about (2n + 3) * 2**-53 of the scaled exact sum, i.e. less than 1/4
  of a unit after the scale is divided out, so rounding recovers the integers exactly.
  The scale is *measured*: header word 0 is 1 on every rank, so after the allreduce it is
  ``n * scale``.
- ``"int64"``: ``F = 63 // b`` binary fields per int64 word (the kernels'
  ``pack_count_fields`` layout); an integer average would floor away the counts, so this
  wire needs ``op=hvd.Sum`` and says so if the scale it measures is not 1.
- ``"float64-radix"`` / ``"int64-radix"``: the same words with digits in base n + 1
  instead of 2**b (``fields.layout(n, radix=True)``): log2(n + 1) bits per coordinate
  instead of ceil(log2(n + 1)), e.g. 1.64 instead of 2.06 at n = 2 and 3.37 instead of
  4.27 at n = 8 on int64 words.  Same exactness rules (float64: every summed word below
  ``2**(50 - b)``; int64: op=Sum).  For n + 1 a power of two they are the binary layouts.

The compressors' ``wire="auto"`` picks the cheapest exact one for the op of each
allreduce (``int64-radix`` for a plain Sum, ``float64-radix`` otherwise; see core.py).

Header words (rank j contributes; the allreduce sums them):

====  ==============  =========================================================
 0    ``one``         1 (measures the scale: n * scale after the allreduce)
 1    ``rank``        j, the rank in the reducing group (sum n(n-1)/2 checks that
                      each of ranks 0..n-1 contributed exactly once)
 2    ``rank_sq``     j**2 (sum (n-1)n(2n-1)/6)
 3    ``size_mod``    q = d mod 2**16 (sum n*q and ...
 4    ``size_mod_sq`` ... sum n*q**2 hold only if every rank has the same q)
 5    ``size``        the message's coordinate count (for the error message)
 6    ``popcount``    number of +1 bits in the message (checksum of the decoded counts)
 7    ``step``        the compressor's step (the sum keys the shared randomness)
 8    ``nonfinite``   number of NaN/Inf values in the rank's tensor
 9    ``bad_ranks``   1 if the rank's tensor has NaN/Inf
10    ``nonce``       20 bits from the rank's stream; all messages of one tensor carry
                      the same value, so a mis-paired message is detected
11    ``r_code``      which R this rank's S_R used: 0 (no shared bound: sign, local R,
                      a fixed R, the first step of a tensor) or 1 + e - lo for the
                      common bound 2**(e/q) (``bound``; lo of ``exponent_range``) ...
12    ``r_code_sq``   ... and its square: n * sum(r**2) == sum(r)**2 iff every rank
                      used the same
13..  settings        the rank's settings (``settings.py``: kind, tie, R policy, fixed R,
                      seed) as ``settings.BINS`` one-bit bins in the wire's own digit
                      layout (``settings_words`` words): each summed bin counts the
                      ranks that set it, so every rank sees which settings differ
 ..   exponent        the rank's e = ``max_exponent(max |g|)``, the least e with
                      2**(e/q) >= max |g| (q = 4 for n <= 15, 2 for n <= 255, else 1),
                      for the common R of the next step (nothing for an all-zero
                      tensor, and for the contributions that do not need it): on
                      float64 wires one word, ``2**(b * e)`` (the sum lies in
                      [2**(bE), n 2**(bE)] with E the max over ranks, so
                      E = floor(log2(sum) / b)); on int64 wires a one-hot histogram
                      of e over ``exponent_range`` in the wire's own digit layout
                      (the highest non-zero bin of the sum is E)
====  ==============  =========================================================

If every rank passes both size checks, then mean(q) = q and mean(q**2) = q**2 over the
ranks, so the variance of q is 0 and all ranks hold the same size mod 2**16; sizes that
differ by a multiple of 2**16 give different word counts, which Horovod itself rejects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from signcomm import kernels as K
from signcomm.comm.base import RankMismatchError
from signcomm.kernels import _fields, fields as codec
from signcomm.kernels.rng import MASK64, splitmix64

from . import settings as S

HEADER = ("one", "rank", "rank_sq", "size_mod", "size_mod_sq", "size", "popcount", "step",
          "nonfinite", "bad_ranks", "nonce", "r_code", "r_code_sq")
NAMED = len(HEADER)
_IDX = {name: i for i, name in enumerate(HEADER)}
H = NAMED + 1           # the fewest header words of a message (the named words and one
                        # exponent word; the settings bins add ``settings_words(n, wire)``)
WIRES = ("float64", "int64", "float64-radix", "int64-radix")
SAFE_BITS = codec.SAFE_BITS
SIZE_MOD = 1 << 16
MAX_DEV = 0.25          # a scaled word further than this from an integer is not exact
NONCE_BITS = 20
EXP_MIN, EXP_MAX = -150, 128    # octaves of a max |g| the header can carry (fp32: -149..128)
_EXP_SPAN = 1000        # float64 wires: b * e stays within +-1000 (normal, with room to scale)
_EXP_SLACK = 2.0 ** -27  # floor((log2(sum) + slack) / b): below the gap log2((n+1)/n) >= 2**-24
# 2**(r / q) for r < q, correctly rounded (the bound 2**(e / q) is ldexp(ROOTS[q][e % q], e // q))
_ROOTS8 = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "0x1.172b83c7d517bp+0", "0x1.306fe0a31b715p+0",
    "0x1.4bfdad5362a27p+0", "0x1.6a09e667f3bcdp+0", "0x1.8ace5422aa0dbp+0",
    "0x1.ae89f995ad3adp+0", "0x1.d5818dcfba487p+0"))
ROOTS = {1: _ROOTS8[:1], 2: _ROOTS8[::4], 4: _ROOTS8[::2], 8: _ROOTS8}


class WireError(RuntimeError):
    """The summed message cannot be decoded exactly (an op other than Sum/Average, a
    scale the int64 wire cannot undo, a corrupted buffer).  Raised on every rank."""


class NonFiniteGradientError(K.NonFiniteError):
    """NaN/Inf in a gradient on at least one rank.  Raised on every rank, after the
    allreduce, so no rank is left waiting."""


def field_bits(n: int) -> int:
    """b = ceil(log2(n + 1)): bits of a field that counts 0..n."""
    return codec.field_bits(n)


def check_wire(wire):
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")


def is_float(wire: str) -> bool:
    return wire.startswith("float64")


@lru_cache(maxsize=None)
def layout(n: int, wire: str = "float64") -> codec.Layout:
    """The digit layout of ``wire`` for n ranks (``signcomm.kernels.fields``)."""
    check_wire(wire)
    try:
        return codec.layout(n, "float64" if is_float(wire) else "int64", wire.endswith("-radix"))
    except ValueError:
        raise ValueError(f"n={n} ranks need {field_bits(n)}-bit count fields; the float64 wires "
                         f"hold at most {SAFE_BITS // 2 - 1}-bit fields (use wire='int64' with "
                         "op=Sum)") from None


def fields_per_word(n: int, wire: str = "float64") -> int:
    """F: coordinates per wire word for n ranks."""
    return layout(n, wire).f


def bits_per_coordinate(n: int, wire: str = "float64") -> float:
    """Wire bits per coordinate, header excluded: 64 / F."""
    return 64.0 / fields_per_word(n, wire)


@lru_cache(maxsize=None)
def exponent_unit(n: int) -> int:
    """q: the common R is a power of 2**(1/q): q = 8 for n <= 7, 4 for n <= 15, 2 for
    n <= 255, 1 beyond (the float64 exponent word holds 2**(b e) with |b e| <= 1000, so
    finer steps leave a narrower range: at least +-41 octaves, see ``exponent_range``)."""
    b = field_bits(n)
    return 8 if b <= 3 else 4 if b <= 4 else 2 if b <= 8 else 1


@lru_cache(maxsize=None)
def exponent_range(n: int, wire: str = "float64"):
    """(lowest, highest) exponent e, in steps of 1/q octave (``exponent_unit``), of a
    bound 2**(e/q) the header carries for n ranks: the octaves [EXP_MIN, EXP_MAX],
    narrowed so that sums of ``2**(b e)`` stay normal floats: -41.6 .. +41.5 octaves
    (3e-13 .. 3e12) for n = 4..7, +-31 for 8..15, +-62 for n = 2, 3, and 16..31."""
    b, q = field_bits(n), exponent_unit(n)
    return max(EXP_MIN * q, -(_EXP_SPAN // b)), min(EXP_MAX * q, _EXP_SPAN // b - 1)


@lru_cache(maxsize=4096)
def bound(e: int, n: int) -> float:
    """The common R of exponent e for n ranks: 2**(e / q), exactly the same float on
    every machine (a correctly rounded root times a power of two)."""
    q = exponent_unit(n)
    return math.ldexp(ROOTS[q][e % q], e // q)


def max_exponent(m: float, n: int):
    """e: the least exponent with ``bound(e, n) >= m`` for a finite m > 0, else None."""
    if not (m > 0 and math.isfinite(m)):
        return None
    q = exponent_unit(n)
    e = math.ceil(q * math.log2(m))
    while bound(e, n) < m:
        e += 1
    while bound(e - 1, n) >= m:
        e -= 1
    return e


@lru_cache(maxsize=None)
def settings_words(n: int, wire: str = "float64") -> int:
    """Header words of the settings bins (``settings.BINS`` digits of the wire's layout)."""
    return layout(n, wire).data_words(S.BINS)


@lru_cache(maxsize=None)
def header_words(n: int, wire: str = "float64") -> int:
    """Header words of one message: the named words, the settings bins, then the
    exponent (one word on float64 wires, a histogram of ``exponent_range`` bins on int64
    wires)."""
    start = NAMED + settings_words(n, wire)
    if is_float(wire):
        return start + 1
    lo, hi = exponent_range(n, wire)
    return start + layout(n, wire).data_words(hi - lo + 1)


@lru_cache(maxsize=256)
def _settings_region(settings, n: int, wire: str):
    """The settings bins of one rank as header words (None: no settings, all zeros)."""
    lay = layout(n, wire)
    if settings is None:
        words = np.zeros(settings_words(n, wire), message_dtype(wire))
    else:
        words = codec.encode_layout(S.packed_bins(settings), S.BINS, lay)[0]
    words.setflags(write=False)
    return words


def data_words(d: int, n: int, wire: str = "float64") -> int:
    return layout(n, wire).data_words(d)


def message_words(d: int, n: int, wire: str = "float64") -> int:
    """Words of one message that carries d coordinates."""
    return header_words(n, wire) + data_words(d, n, wire)


def split(d: int, n: int, wire: str, max_words: int):
    """[(offset, length), ...]: the messages of a d-coordinate tensor, each at most
    ``max_words`` words (header included) and each but the last a multiple of 8
    coordinates long.  d = 0 still makes one (header-only) message."""
    f = fields_per_word(n, wire)
    hw = header_words(n, wire)
    per = (int(max_words) - hw) * f // 8 * 8   # whole bytes of the packed bits
    if per < 8:
        raise ValueError(f"max_message_words={max_words} leaves no room for 8 coordinates "
                         f"after the {hw}-word header")
    if d == 0:
        return [(0, 0)]
    return [(o, min(per, d - o)) for o in range(0, d, per)]


def count_dtype(n: int):
    """Smallest unsigned dtype holding 0..n (the counts' canonical form)."""
    return np.uint8 if n < 256 else (np.uint16 if n < 65536 else np.uint32)


def counts_hash(counts, mix=None) -> int:
    """A 64-bit hash of the counts: their bytes in the canonical dtype (``count_dtype``,
    little-endian), zero-padded to whole 8-byte words u_0, u_1, ...; then
    ``splitmix64((sum_i splitmix64(u_i + (i + 1) * GOLDEN) mod 2**64) ^ nbytes)`` with
    nbytes the unpadded length.  All ranks decode the same counts, so all get the same
    number, whatever order their gradient hooks fired in; it keys the shared randomness
    (tie coins, S_1).  (About 0.2 ns per coordinate; BLAKE2b took ten times longer.)
    ``mix``: the sum over the whole words, if the decode already took it (``decode``'s
    ``mix_base``; uint8 counts), so only the tail is read here."""
    c = np.ascontiguousarray(counts)
    c = c.astype(c.dtype.newbyteorder("<"), copy=False)
    raw = c.view(np.uint8).reshape(-1)
    nbytes = raw.shape[0]
    whole = nbytes // 8 * 8
    h = int(mix) if mix is not None else codec.mix_sum_bytes(raw)
    if whole < nbytes:
        tail = np.zeros(8, np.uint8)
        tail[:nbytes - whole] = raw[whole:]
        z = int(tail.view("<u8")[0]) + (whole // 8 + 1) * int(_fields.GOLDEN)
        h += splitmix64(z)
    return splitmix64((h & MASK64) ^ nbytes)


def message_dtype(wire: str):
    return np.float64 if is_float(wire) else np.int64


def encode(packed, offset: int, m: int, n: int, rank: int, *, step: int, nonfinite: int,
           nonce: int, wire: str = "float64", exponent=None, r_code: int = 0, settings=None,
           out=None):
    """This rank's message for coordinates ``offset .. offset + m - 1`` of ``packed`` (one
    bit per coordinate of the whole tensor).  ``exponent``: this rank's e of
    ``max_exponent`` (None: none to report; clipped to ``exponent_range``);
    ``r_code``: the R it used (header word 11); ``settings``: the compressor's
    ``settings.Settings`` (None: no bins set, for codec tests).  ``out``: the message buffer
    (``message_words`` long, ``message_dtype``), else a new one.  Returns (words,
    popcount)."""
    check_wire(wire)
    lay = layout(n, wire)
    hw = header_words(n, wire)
    if offset % 8:
        raise ValueError("message offsets must be multiples of 8 coordinates")
    part = packed[offset // 8: offset // 8 + K.packed_nbytes(m)]
    if m % 8:
        part = K.clear_padding(part.copy(), m)
    out, pop = codec.encode_layout(part, m, lay, header=hw, out=out)
    q = m % SIZE_MOD
    out[:NAMED] = (1, rank, rank * rank, q, q * q, m, pop, step, nonfinite, int(nonfinite > 0),
                   nonce, r_code, r_code * r_code)
    x = NAMED + settings_words(n, wire)
    out[NAMED:x] = _settings_region(settings, n, wire)
    lo, hi = exponent_range(n, wire)
    e = None if exponent is None else min(hi, max(lo, int(exponent)))
    if is_float(wire):
        out[x] = 0.0 if e is None else math.ldexp(1.0, lay.b * e)
    else:
        bins = np.zeros(K.packed_nbytes(hi - lo + 1), np.uint8)
        if e is not None:
            bins[(e - lo) >> 3] = 1 << ((e - lo) & 7)
        out[x:hw] = codec.encode_layout(bins, hi - lo + 1, lay)[0]
    return out, pop


@dataclass
class Decoded:
    """What one summed message says: header sums (exact integers), the scale, the max
    over ranks of their max-|g| exponents (None if every rank's tensor was all zeros or
    reported none) and whether every rank used the same R."""

    sums: dict
    scale: float
    exponent: object = None
    r_agree: bool = True
    mix: object = None        # the counts' mix_sum from word mix_base on (decode's)

    def __getitem__(self, name):
        return self.sums[name]


def _describe(describe):
    return describe() if callable(describe) else str(describe)


def _exponent(words, n, wire, inv_scale, describe):
    """The max exponent E from the summed exponent region, or None."""
    lo, hi = exponent_range(n, wire)
    lay = layout(n, wire)
    x = NAMED + settings_words(n, wire)
    if is_float(wire):
        s = float(words[x]) * inv_scale
        if not s > 0:
            return None
        e = math.floor((math.log2(s) + _EXP_SLACK) / lay.b)
        if not lo <= e <= hi:
            raise WireError(f"{_describe(describe)}: the summed exponent word {s!r} is not a "
                            f"sum of at most {n} powers 2**({lay.b} e), {lo} <= e <= {hi}")
        return e
    nb = hi - lo + 1
    hist = np.empty(nb, count_dtype(n))
    got = codec.decode_layout(words[x:header_words(n, wire)], nb, lay, n, hist)
    if got.bad or got.total > n:
        raise WireError(f"{_describe(describe)}: the summed exponent histogram is not one of "
                        f"at most {n} ranks")
    nz = np.flatnonzero(hist)
    return int(lo + nz[-1]) if nz.size else None


_SETTINGS_PASSED = {}   # summed settings regions that passed (see _check_settings)


def _check_settings(words, n, rank, wire, inv_scale, settings, describe):
    """Read the summed settings bins and compare them with this rank's ``settings``.  The
    outcome depends only on the region's words, the scale, n, the wire and ``settings``,
    and every tensor of a step carries the same region: a region that passed is
    remembered, so later tensors skip the decode (tens of microseconds a tensor)."""
    region = words[NAMED:NAMED + settings_words(n, wire)]
    seen = (region.tobytes(), region.dtype.char, n, wire, inv_scale, settings)
    if seen in _SETTINGS_PASSED:
        return
    counts = np.empty(S.BINS, count_dtype(n))
    got = codec.decode_layout(region, S.BINS, layout(n, wire), n, counts, inv_scale=inv_scale)
    if not got.max_dev <= MAX_DEV or got.bad:
        raise WireError(f"{_describe(describe)}: the summed settings bins are not counts of "
                        f"{n} ranks: was the wire tensor modified on its way?")
    if settings is not None:
        settings.check(counts, n, rank, lambda: _describe(describe))
    if len(_SETTINGS_PASSED) >= 1024:
        _SETTINGS_PASSED.clear()
    _SETTINGS_PASSED[seen] = True


def decode(words, m: int, n: int, rank: int, counts_out, *, wire: str = "float64",
           describe="a tensor", settings=None, mix_base=None):
    """Decode one summed message into ``counts_out`` (length m) and return its header
    sums.  Checks, in order, each raising the same error on every rank: the scale is
    one an exact decode can undo (``WireError``); each of ranks 0..n-1 contributed once
    (``RankMismatchError``: the header is integral and its rank checksums match); every
    rank sent the same number of coordinates (``RankMismatchError``); the settings bins
    are exact counts (``WireError``) and, when ``settings`` (this rank's) is given, every
    rank has the same settings (``RankMismatchError`` naming them); no rank had NaN/Inf
    (``NonFiniteGradientError``); the data words are exact counts of n ranks whose total
    is the popcount sum (``WireError``).  ``describe`` (a string or a callable returning
    one) names the tensor in messages.  ``mix_base`` (uint8 counts): the decode also
    takes ``counts_hash``'s sum over the whole count words, keyed from word mix_base
    (the message's offset / 8 in its tensor), into ``Decoded.mix``."""
    check_wire(wire)
    words = np.ascontiguousarray(words)
    lay = layout(n, wire)
    hw = header_words(n, wire)
    nwords = lay.data_words(m)
    if words.ndim != 1 or words.shape[0] != hw + nwords:
        raise RankMismatchError(
            f"{_describe(describe)}: the summed message has {words.shape[0]} words, this "
            f"rank expects {hw + nwords} for {m} coordinates (different sizes on different ranks?)")
    z0 = float(words[0])
    if not (np.isfinite(z0) and z0 > 0):
        raise WireError(
            f"{_describe(describe)}: header word 0 summed to {z0!r}, not a positive scale "
            "of n: signcomm compressors need an allreduce with op=hvd.Sum or hvd.Average "
            "(pre/postscale factors are fine)")
    if not is_float(wire):
        if words.dtype != np.int64:
            raise WireError(f"{_describe(describe)}: {wire} wire came back as {words.dtype}")
        if int(words[0]) != n:
            raise WireError(
                f"{_describe(describe)}: the {wire} wire needs op=hvd.Sum without scaling "
                f"(header word 0 summed to {int(words[0])}, expected n={n}); use the "
                "float64 wires (wire='auto' picks them) with op=hvd.Average or a predivide "
                "factor")
        sums = dict(zip(HEADER, words[:NAMED].tolist()))
        scale = 1.0
        inv_scale = 1.0
    else:
        inv_scale = n / z0
        head = words[:hw].tolist()   # (Python floats: a few header words, no array ops)
        if not all(map(math.isfinite, head)):
            raise WireError(f"{_describe(describe)}: the summed header has NaN/Inf "
                            f"({head}): was the wire tensor modified on its "
                            "way (another compression, an fp16 cast)?")
        scaled = [w * inv_scale for w in head[:NAMED]]
        ints = [round(x) for x in scaled]   # to nearest, ties to even (as np.rint)
        if not all(abs(x - i) <= MAX_DEV for x, i in zip(scaled, ints)):
            # A header that is not integral under the measured scale: word 0 did not
            # sum to n times the scale of the others, i.e. not n contributions.
            raise RankMismatchError(
                f"{_describe(describe)}: the allreduce did not sum exactly one contribution "
                f"from each of ranks 0..{n - 1} (header scaled by n / word 0: "
                f"{scaled}): give the compressor the process_set (or size) of the "
                "group the allreduce runs over, and use op=hvd.Sum or hvd.Average")
        sums = dict(zip(HEADER, ints))
        scale = z0 / n
    want_r = n * (n - 1) // 2
    want_r2 = (n - 1) * n * (2 * n - 1) // 6
    if sums["rank"] != want_r or sums["rank_sq"] != want_r2:
        raise RankMismatchError(
            f"{_describe(describe)}: the allreduce did not sum exactly one contribution from "
            f"each of ranks 0..{n - 1} (rank checksums {sums['rank']}, {sums['rank_sq']}; "
            f"expected {want_r}, {want_r2}): use op=hvd.Sum or hvd.Average, and give the "
            "compressor the process_set (or size) of the group the allreduce runs over")
    q = m % SIZE_MOD
    if sums["size_mod"] != n * q or sums["size_mod_sq"] != n * q * q:
        raise RankMismatchError(
            f"{_describe(describe)}: ranks hold different sizes (this rank: {m} "
            f"coordinates, mean over the {n} ranks: {sums['size'] / n:g})")
    _check_settings(words, n, rank, wire, inv_scale, settings, describe)
    if sums["bad_ranks"]:
        raise NonFiniteGradientError(
            f"{_describe(describe)}: NaN/Inf in the gradient on {sums['bad_ranks']} of {n} "
            f"ranks ({sums['nonfinite']} values in all); nothing was applied")
    got = codec.decode_layout(words[hw:], m, lay, n, counts_out, inv_scale=inv_scale,
                              mix_base=mix_base)
    if not got.max_dev <= MAX_DEV or got.bad or got.total != sums["popcount"]:
        raise WireError(
            f"{_describe(describe)}: the summed data words are not exact counts of {n} "
            f"ranks (largest rounding error {got.max_dev:.3g}, {got.bad} impossible words, "
            f"total {got.total} vs popcount sum {sums['popcount']}): was the wire tensor "
            "modified on its way (another compression, an fp16 cast)?")
    exponent = _exponent(words, n, wire, inv_scale, describe)
    r_agree = n * sums["r_code_sq"] == sums["r_code"] ** 2
    return Decoded(sums, scale, exponent, r_agree, got.mix)
