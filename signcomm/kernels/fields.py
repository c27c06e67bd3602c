"""Count fields: the one codec that lets an ordinary sum allreduce count votes exactly.

Each rank writes its bit (one per coordinate) as a digit of a word: coordinate i is
field ``i % F`` of word ``i // F``, and the word's integer value is ``sum_j c_j * B**j``
over its fields j.  A sum of n such words adds every digit separately as long as a digit's
sum, a count 0..n, stays below the base B (no carry), so the summed words hold the exact
per-coordinate counts c.  Two families of layouts (``Layout``):

- **binary** (``B = 2**b``, ``b = ceil(log2(n + 1))``): field j occupies bits
  ``j*b .. j*b + b - 1``.  The ``allreduce`` vote schedule and the compressors'
  ``wire="int64"`` / ``"float64"`` use these;
- **radix** (``B = n + 1``): the fewest bits per count, log2(n + 1) instead of
  ceil(log2(n + 1)) (n = 2: 1.58 instead of 2; n = 8: 3.17 instead of 4).  Built for
  n < 256 (``layout(n, radix=True)`` gives the binary layout beyond); identical to the
  binary layout when n + 1 is a power of two.

and two word types:

- ``"int64"``: ``B**F <= 2**63``: ``F = 63 // b`` for binary fields; exact under an
  integer Sum only;
- ``"float64"``: ``B**F <= 2**(50 - b)``: ``F = (50 - b) // b`` for binary fields, so
  every word and every sum of n words is an integer below ``2**(50 - b)``: a scaled sum
  (Average, pre/post scale factors) can be rounded back exactly once the scale is divided
  out (the compressors' wires).

``encode`` / ``decode`` (binary, by field bits) and ``encode_layout`` / ``decode_layout``
(any layout) can leave ``header`` words in front for the caller (the compressors' header).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np

from . import _fields
from ._cpu import pick_kernel
from .bits import check_packed, packed_nbytes
from .xp import is_cupy

WORDS = ("int64", "float64")
SAFE_BITS = 50   # float64 words (and their sums) stay below 2**(SAFE_BITS - b)
RADIX_MAX_N = 255   # radix layouts for n up to this (counts fit a byte)
_GROUP_LIMIT = 1 << 13   # radix decode: k digits per lookup with base**k <= this
PARALLEL_WORDS = 1 << 15  # fewer words (or one numba thread): the serial kernels, no
                          # thread-pool wake-up (milliseconds on busy cores)


def field_bits(n: int) -> int:
    """b = ceil(log2(n + 1)): bits of a field that counts 0..n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return int(n).bit_length()


def check_word(word):
    if word not in WORDS:
        raise ValueError(f"word must be one of {WORDS}, got {word!r}")


def fields_per_word(b: int, word: str = "int64") -> int:
    """F: fields of ``b`` bits per word (binary layout)."""
    check_word(word)
    f = 63 // b if word == "int64" else (SAFE_BITS - b) // b
    if f < 1:
        raise ValueError(f"{b}-bit count fields do not fit a {word} word (at most "
                         f"{63 if word == 'int64' else SAFE_BITS // 2 - 1} bits): use int64 words")
    return f


def data_words(d: int, b: int, word: str = "int64") -> int:
    return -(-int(d) // fields_per_word(b, word))


@dataclass(frozen=True)
class Layout:
    """One count-field layout: ``word`` type, digit ``base`` B, ``f`` fields per word;
    ``b`` is ceil(log2(n + 1)) of the group it was made for (binary: the field width)."""

    word: str
    base: int
    f: int
    b: int
    radix: bool

    @property
    def bits_per_coordinate(self) -> float:
        return 64.0 / self.f

    @property
    def limit(self) -> int:
        """Every summed word of n ranks is below this (B**F)."""
        return self.base ** self.f

    def data_words(self, d: int) -> int:
        return -(-int(d) // self.f)

    @property
    def name(self) -> str:
        return f"{self.word}{'-radix' if self.radix else ''}"


@lru_cache(maxsize=None)
def binary_layout(b: int, word: str = "int64") -> Layout:
    """The b-bit binary layout (``fields_per_word``)."""
    return Layout(word, 1 << b, fields_per_word(b, word), b, False)


def _radix_f(base: int, b: int, word: str) -> int:
    cap = 2 ** 63 if word == "int64" else 2 ** (SAFE_BITS - b)
    f = 0
    while base ** (f + 1) <= cap:
        f += 1
    return f


@lru_cache(maxsize=None)
def layout(n: int, word: str = "int64", radix: bool = False) -> Layout:
    """The layout for sums of n ranks: binary ``b``-bit fields, or radix ``n + 1``
    (n <= RADIX_MAX_N; beyond it, and where n + 1 is a power of two, the binary one)."""
    check_word(word)
    b = field_bits(n)
    if not radix or n > RADIX_MAX_N or (n + 1) & n == 0:
        try:
            return binary_layout(b, word)
        except ValueError:
            raise ValueError(f"n={n} ranks need {b}-bit count fields; a {word} word holds "
                             f"at most {SAFE_BITS // 2 - 1 if word == 'float64' else 63}-bit "
                             "fields (use int64 words)") from None
    return Layout(word, n + 1, _radix_f(n + 1, b, word), b, True)


def _tables(lay: Layout):
    key = (lay.base, lay.f)
    t = _TABLES.get(key)
    if t is None:
        t = (_fields.digit_table(lay.base), _fields.byte_powers(lay.base, lay.f))
        _TABLES[key] = t
    return t


_TABLES = {}
_GROUPS = {}


def _group(base: int):
    g = _GROUPS.get(base)
    if g is None:
        k = 1
        while k < 8 and base ** (k + 1) <= _GROUP_LIMIT:
            k += 1
        g = (k, _fields.group_table(base, k))
        _GROUPS[base] = g
    return g


def encode_layout(packed, d: int, lay: Layout, *, header: int = 0, out=None):
    """Packed bits of d coordinates -> ``header`` free words then the field words of
    layout ``lay`` (int64 or float64), in ``out`` if given (that length and dtype).
    Returns (words, popcount of the bits)."""
    check_packed(packed, d)
    nwords = lay.data_words(d)
    dtype = np.int64 if lay.word == "int64" else np.float64
    if out is None:
        out = np.empty(header + nwords, dtype)
    elif out.shape != (header + nwords,) or out.dtype != dtype:
        raise ValueError(f"out must be {np.dtype(dtype)} of length {header + nwords}")
    table, powers = _tables(lay)
    kernel = pick_kernel(_fields.encode_words, _fields.encode_words_serial, nwords,
                         PARALLEL_WORDS)
    pop = int(kernel(packed, int(d), lay.f, table, powers, out[header:])) if d else 0
    return out, pop


class FieldSums(NamedTuple):
    """What a decode of field words found besides the counts."""

    max_dev: float    # largest distance of a scaled float64 word from its integer
    total: int        # the counts' total
    bad: int          # impossible words: a field above n, a value at or above B**F,
                      # bits above the last field, a negative word
    mix: Optional[int] = None   # with mix_base: the counts' ``_fields.mix_sum``


def decode_layout(words, d: int, lay: Layout, n: int, counts_out, *, inv_scale: float = 1.0,
                  mix_base=None) -> FieldSums:
    """Summed field words of layout ``lay`` (no header) -> ``counts_out`` (length d).
    float64 words are multiplied by ``inv_scale`` and rounded.  With ``mix_base`` (uint8
    counts only), ``FieldSums.mix`` is ``_fields.mix_sum`` of the d // 8 whole 8-byte
    words of the counts keyed from word ``mix_base`` on (the radix decode takes it in the
    same pass); else None."""
    words = np.ascontiguousarray(words)
    is_float = words.dtype == np.float64
    limit = float(lay.limit)
    vmax = min(lay.limit - 1, 2 ** 63 - 1)
    d = int(d)
    nwords = words.shape[0]
    if mix_base is not None and counts_out.dtype != np.uint8:
        raise ValueError("mix_base needs uint8 counts")
    mix = None
    if lay.radix:
        k, table = _group(lay.base)
        out = counts_out if counts_out.dtype == np.uint8 else np.empty(d, np.uint8)
        kernel = pick_kernel(_fields.decode_radix8, _fields.decode_radix8_serial, nwords,
                             PARALLEL_WORDS)
        dev, bad, tot, mix = kernel(words, float(inv_scale), is_float, limit, vmax, d,
                                    lay.base, lay.f, k, table, out, int(mix_base or 0))
        if out is not counts_out:
            counts_out[:] = out
    elif counts_out.dtype == np.uint8 and lay.b <= 7 and _fields.HAVE_PDEP:
        kernel = pick_kernel(_fields.decode_binary8, _fields.decode_binary8_serial, nwords,
                             PARALLEL_WORDS)
        dev, bad = kernel(words, float(inv_scale), is_float, limit, vmax, d, lay.b, lay.f,
                          int(n), counts_out)
        tot = _fields.byte_total(counts_out)
    else:
        dev, tot, bad = _fields.decode_fields_any(words, float(inv_scale), is_float, limit,
                                                  vmax, d, lay.b, lay.f, int(n), counts_out)
    if mix_base is None:
        return FieldSums(float(dev), int(tot), int(bad))
    if mix is None:
        mix = mix_sum_bytes(counts_out[:d], int(mix_base))
    return FieldSums(float(dev), int(tot), int(bad), int(mix))


def mix_sum_bytes(raw, i0: int = 0) -> int:
    """``_fields.mix_sum`` of the whole little-endian 8-byte words of the uint8 array
    ``raw`` (a trailing partial word is left out), word i keyed as word i0 + i; the
    words are copied only when ``raw`` is not 8-byte aligned."""
    words = raw[:raw.shape[0] // 8 * 8].view("<u8")
    return int(_fields.mix_sum(words if words.flags.aligned else words.copy(), i0))


def encode(packed, d: int, b: int, word: str = "int64", *, header: int = 0):
    """Packed bits of d coordinates -> ``header`` free words then the b-bit binary field
    words (int64 or float64).  Returns (words, popcount of the bits)."""
    check_word(word)
    return encode_layout(packed, d, binary_layout(b, word), header=header)


def decode(words, d: int, b: int, n: int, counts_out, word: str = "int64", *,
           inv_scale: float = 1.0) -> FieldSums:
    """Summed b-bit binary field words (no header) -> ``counts_out`` (length d), and
    ``decode_layout``'s ``FieldSums``."""
    check_word(word)
    words = np.ascontiguousarray(words)
    return decode_layout(words, d, binary_layout(b, word), n, counts_out,
                         inv_scale=inv_scale if word == "float64" else 1.0)


def pack_int64(packed, d: int, b: int):
    """int64 field words of d coordinates (NumPy, or CuPy through the reference)."""
    if is_cupy(packed):
        from . import reference
        return reference.pack_count_fields(packed, d, b)
    return encode(packed, d, b, "int64")[0]


def unpack_int64(words, d: int, b: int):
    """Summed int64 field words -> per-coordinate counts (int64)."""
    if words.ndim != 1 or words.shape[0] < data_words(d, b):
        raise ValueError(f"words must be 1-D with at least {data_words(d, b)} entries for "
                         f"d={d}, got shape {words.shape}")
    if is_cupy(words):
        from . import reference
        return reference.unpack_count_fields(words, d, b)
    out = np.empty(d, np.int64)
    lay = binary_layout(b, "int64")
    w = np.ascontiguousarray(words[:lay.data_words(d)])
    if w.dtype != np.int64:
        w = w.astype(np.int64)
    _fields.decode_fields_any(w, 1.0, False, 0.0, 2 ** 63 - 1, int(d), b, lay.f,
                              np.int64((1 << b) - 1) if b < 64 else np.int64(-1), out)
    return out
