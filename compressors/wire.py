"""The compressors' wire format: count fields that any Sum or Average allreduce adds exactly.

Each rank turns its d one-bit contributions (kernels' bit convention) into one or more
*messages*.  A message is a 1-D array of ``HEADER`` words followed by ``ceil(m / F)``
data words for the message's m coordinates; coordinate i of the message is field
``i % F`` of data word ``i // F``, a field of ``b = ceil(log2(n + 1))`` bits that holds
this rank's bit.  Summing the messages of the n ranks sums every field separately
(a field's sum is a count 0..n < 2**b, so it never carries into the next field): the
summed data words hold the per-coordinate counts c, exactly.

Two wires:

- ``"float64"`` (default): ``F = (50 - b) // b`` fields per float64 word, so every word and
  every sum of n words is an integer below ``2**(50 - b)``.  An allreduce that scales
  (``op=Average`` divides by n; ``gradient_predivide_factor`` multiplies by 1/f before
  and f after) keeps the sum within a relative error of about (2n + 3) * 2**-53 of the
  scaled exact sum, i.e. less than 1/4 of a unit after the scale is divided out, so
  rounding recovers the integers exactly.  The scale is *measured*: header word 0 is 1
  on every rank, so after the allreduce it is ``n * scale``.
- ``"int64"``: ``F = 63 // b`` fields per int64 word (the kernels' ``pack_count_fields``
  layout, fewer bits on the wire); an integer average would floor away the counts, so
  this wire needs ``op=hvd.Sum`` and says so if the scale it measures is not 1.

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
====  ==============  =========================================================

If every rank passes both size checks, then mean(q) = q and mean(q**2) = q**2 over the
ranks, so the variance of q is 0 and all ranks hold the same size mod 2**16; sizes that
differ by a multiple of 2**16 give different word counts, which Horovod itself rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from signcomm import kernels as K
from signcomm.comm.base import RankMismatchError
from signcomm.kernels import _fields, fields as codec
from signcomm.kernels.rng import MASK64, splitmix64

HEADER = ("one", "rank", "rank_sq", "size_mod", "size_mod_sq", "size", "popcount", "step",
          "nonfinite", "bad_ranks", "nonce")
H = len(HEADER)
_IDX = {name: i for i, name in enumerate(HEADER)}
WIRES = ("float64", "int64")
SAFE_BITS = codec.SAFE_BITS
SIZE_MOD = 1 << 16
MAX_DEV = 0.25          # a scaled word further than this from an integer is not exact
NONCE_BITS = 20


class WireError(RuntimeError):
    """The summed message cannot be decoded exactly (an op other than Sum/Average, a
    scale the int64 wire cannot undo, a corrupted buffer).  Raised on every rank."""


class NonFiniteGradientError(K.NonFiniteError):
    """NaN/Inf in a gradient on at least one rank.  Raised on every rank, after the
    allreduce, so no rank is left waiting."""


def field_bits(n: int) -> int:
    """b = ceil(log2(n + 1)): bits of a field that counts 0..n."""
    return codec.field_bits(n)


def fields_per_word(n: int, wire: str = "float64") -> int:
    """F: coordinates per wire word for n ranks (the codec's, ``signcomm.kernels.fields``)."""
    check_wire(wire)
    try:
        return codec.fields_per_word(field_bits(n), wire)
    except ValueError:
        raise ValueError(f"n={n} ranks need {field_bits(n)}-bit count fields; the float64 wire "
                         f"holds at most {SAFE_BITS // 2 - 1}-bit fields (use wire='int64' with "
                         "op=Sum)") from None


def bits_per_coordinate(n: int, wire: str = "float64") -> float:
    """Wire bits per coordinate, header excluded: 64 / F."""
    return 64.0 / fields_per_word(n, wire)


def data_words(d: int, n: int, wire: str = "float64") -> int:
    f = fields_per_word(n, wire)
    return -(-int(d) // f)


def message_words(d: int, n: int, wire: str = "float64") -> int:
    """Words of one message that carries d coordinates."""
    return H + data_words(d, n, wire)


def split(d: int, n: int, wire: str, max_words: int):
    """[(offset, length), ...]: the messages of a d-coordinate tensor, each at most
    ``max_words`` words (header included) and each but the last a multiple of 8
    coordinates long.  d = 0 still makes one (header-only) message."""
    f = fields_per_word(n, wire)
    per = (int(max_words) - H) * f // 8 * 8   # whole bytes of the packed bits
    if per < 8:
        raise ValueError(f"max_message_words={max_words} leaves no room for 8 coordinates "
                         f"after the {H}-word header")
    if d == 0:
        return [(0, 0)]
    return [(o, min(per, d - o)) for o in range(0, d, per)]


def count_dtype(n: int):
    """Smallest unsigned dtype holding 0..n (the counts' canonical form)."""
    return np.uint8 if n < 256 else (np.uint16 if n < 65536 else np.uint32)


def counts_hash(counts) -> int:
    """A 64-bit hash of the counts: their bytes in the canonical dtype (``count_dtype``,
    little-endian), zero-padded to whole 8-byte words u_0, u_1, ...; then
    ``splitmix64((sum_i splitmix64(u_i + (i + 1) * GOLDEN) mod 2**64) ^ nbytes)`` with
    nbytes the unpadded length.  All ranks decode the same counts, so all get the same
    number, whatever order their gradient hooks fired in; it keys the shared randomness
    (tie coins, S_1).  (About 0.2 ns per coordinate; BLAKE2b took ten times longer.)"""
    c = np.ascontiguousarray(counts)
    c = c.astype(c.dtype.newbyteorder("<"), copy=False)
    raw = c.view(np.uint8).reshape(-1)
    nbytes = raw.shape[0]
    whole = nbytes // 8 * 8
    if whole:
        words = raw[:whole].view("<u8")
        h = int(_fields.mix_sum(words if words.flags.aligned else words.copy()))
    else:
        h = 0
    if whole < nbytes:
        tail = np.zeros(8, np.uint8)
        tail[:nbytes - whole] = raw[whole:]
        z = int(tail.view("<u8")[0]) + (whole // 8 + 1) * int(_fields.GOLDEN)
        h += splitmix64(z)
    return splitmix64((h & MASK64) ^ nbytes)


def check_wire(wire):
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")


def encode(packed, offset: int, m: int, n: int, rank: int, *, step: int, nonfinite: int,
           nonce: int, wire: str = "float64"):
    """This rank's message for coordinates ``offset .. offset + m - 1`` of ``packed`` (one
    bit per coordinate of the whole tensor).  Returns (words, popcount)."""
    check_wire(wire)
    b = field_bits(n)
    fields_per_word(n, wire)  # the wire's clear error when n needs too wide fields
    if offset % 8:
        raise ValueError("message offsets must be multiples of 8 coordinates")
    part = packed[offset // 8: offset // 8 + K.packed_nbytes(m)]
    if m % 8:
        part = K.clear_padding(part.copy(), m)
    out, pop = codec.encode(part, m, b, wire, header=H)
    q = m % SIZE_MOD
    out[:H] = (1, rank, rank * rank, q, q * q, m, pop, step, nonfinite, int(nonfinite > 0),
               nonce)
    return out, pop


@dataclass
class Decoded:
    """What one summed message says: header sums (exact integers) and the scale."""

    sums: dict
    scale: float

    def __getitem__(self, name):
        return self.sums[name]


def _describe(describe):
    return describe() if callable(describe) else str(describe)


def decode(words, m: int, n: int, rank: int, counts_out, *, wire: str = "float64",
           describe="a tensor"):
    """Decode one summed message into ``counts_out`` (length m) and return its header
    sums.  Checks, in order, each raising the same error on every rank: the scale is
    one an exact decode can undo (``WireError``); each of ranks 0..n-1 contributed once
    (``RankMismatchError``: the header is integral and its rank checksums match); every rank sent the same number of coordinates
    (``RankMismatchError``); no rank had NaN/Inf (``NonFiniteGradientError``); the data
    words are exact counts of n ranks whose total is the popcount sum (``WireError``).
    ``describe`` (a string or a callable returning one) names the tensor in messages."""
    check_wire(wire)
    words = np.ascontiguousarray(words)
    b = field_bits(n)
    f = fields_per_word(n, wire)
    nwords = -(-m // f)
    if words.ndim != 1 or words.shape[0] != H + nwords:
        raise RankMismatchError(
            f"{_describe(describe)}: the summed message has {words.shape[0]} words, this "
            f"rank expects {H + nwords} for {m} coordinates (different sizes on different ranks?)")
    z0 = float(words[0])
    if not (np.isfinite(z0) and z0 > 0):
        raise WireError(
            f"{_describe(describe)}: header word 0 summed to {z0!r}, not a positive scale "
            "of n: signcomm compressors need an allreduce with op=hvd.Sum or hvd.Average "
            "(pre/postscale factors are fine)")
    if wire == "int64":
        if words.dtype != np.int64:
            raise WireError(f"{_describe(describe)}: int64 wire came back as {words.dtype}")
        if int(words[0]) != n:
            raise WireError(
                f"{_describe(describe)}: the int64 wire needs op=hvd.Sum without scaling "
                f"(header word 0 summed to {int(words[0])}, expected n={n}); use the "
                "float64 wire (the default) with op=hvd.Average or a predivide factor")
        sums = {name: int(words[i]) for i, name in enumerate(HEADER)}
        scale = 1.0
    else:
        inv_scale = n / z0
        if not np.all(np.isfinite(words[:H])):
            raise WireError(f"{_describe(describe)}: the summed header has NaN/Inf "
                            f"({words[:H].tolist()}): was the wire tensor modified on its "
                            "way (another compression, an fp16 cast)?")
        scaled = words[:H].astype(np.float64) * inv_scale
        ints = np.rint(scaled)
        if not np.all(np.abs(scaled - ints) <= MAX_DEV):
            # A header that is not integral under the measured scale: word 0 did not
            # sum to n times the scale of the others, i.e. not n contributions.
            raise RankMismatchError(
                f"{_describe(describe)}: the allreduce did not sum exactly one contribution "
                f"from each of ranks 0..{n - 1} (header scaled by n / word 0: "
                f"{scaled.tolist()}): give the compressor the process_set (or size) of the "
                "group the allreduce runs over, and use op=hvd.Sum or hvd.Average")
        sums = {name: int(ints[i]) for i, name in enumerate(HEADER)}
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
    if sums["bad_ranks"]:
        raise NonFiniteGradientError(
            f"{_describe(describe)}: NaN/Inf in the gradient on {sums['bad_ranks']} of {n} "
            f"ranks ({sums['nonfinite']} values in all); nothing was applied")
    max_dev, total, bad = codec.decode(words[H:], m, b, n, counts_out, wire,
                                       inv_scale=inv_scale if wire == "float64" else 1.0)
    if not max_dev <= MAX_DEV or bad or int(total) != sums["popcount"]:
        raise WireError(
            f"{_describe(describe)}: the summed data words are not exact counts of {n} "
            f"ranks (largest rounding error {max_dev:.3g}, {bad} impossible words, total "
            f"{int(total)} vs popcount sum {sums['popcount']}): was the wire tensor "
            "modified on its way (another compression, an fp16 cast)?")
    return Decoded(sums, scale)
