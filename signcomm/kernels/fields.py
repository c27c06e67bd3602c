"""Count fields: the one codec that lets an ordinary sum allreduce count votes exactly.

Each rank spreads its bits (one per coordinate) into fields of ``b = ceil(log2(n + 1))``
bits; coordinate i is field ``i % F`` of word ``i // F``, at bits ``j*b .. j*b + b - 1``
of the word's integer value.  A sum of n such words adds every field separately (a
field's sum is a count 0..n < 2**b, never carrying into the next), so the summed words
hold the exact per-coordinate counts c.  Two word types:

- ``"int64"``: ``F = 63 // b`` fields per int64 word; exact under an integer Sum only
  (the ``allreduce`` vote schedule; the compressors' ``wire="int64"``);
- ``"float64"``: ``F = (50 - b) // b`` fields per float64 word, so every word and every
  sum of n words is an integer below ``2**(50 - b)``: a scaled sum (Average, pre/post
  scale factors) can be rounded back exactly once the scale is divided out (the
  compressors' default wire).

``encode`` can leave ``header`` words in front for the caller (the compressors' header).
"""
from __future__ import annotations

import numpy as np

from . import _cpu, _fields
from .bits import check_packed, packed_nbytes
from .xp import is_cupy

WORDS = ("int64", "float64")
SAFE_BITS = 50   # float64 words (and their sums) stay below 2**(SAFE_BITS - b)


def field_bits(n: int) -> int:
    """b = ceil(log2(n + 1)): bits of a field that counts 0..n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return int(n).bit_length()


def check_word(word):
    if word not in WORDS:
        raise ValueError(f"word must be one of {WORDS}, got {word!r}")


def fields_per_word(b: int, word: str = "int64") -> int:
    """F: fields of ``b`` bits per word."""
    check_word(word)
    f = 63 // b if word == "int64" else (SAFE_BITS - b) // b
    if f < 1:
        raise ValueError(f"{b}-bit count fields do not fit a {word} word (at most "
                         f"{63 if word == 'int64' else SAFE_BITS // 2 - 1} bits): use int64 words")
    return f


def data_words(d: int, b: int, word: str = "int64") -> int:
    return -(-int(d) // fields_per_word(b, word))


def encode(packed, d: int, b: int, word: str = "int64", *, header: int = 0):
    """Packed bits of d coordinates -> ``header`` free words then the field words (int64
    or float64).  Returns (words, popcount of the bits)."""
    check_packed(packed, d)
    check_word(word)
    f = fields_per_word(b, word)
    nwords = data_words(d, b, word)
    out = np.empty(header + nwords, np.int64 if word == "int64" else np.float64)
    if word == "float64":
        pop = int(_fields.encode_fields(packed, d, b, f, _fields.spread(b), out[header:]))
    else:
        if d:
            _cpu.pack_count_fields(packed, d, b, out[header:])
        pop = int(np.bitwise_count(packed[:packed_nbytes(d)]).sum(dtype=np.int64)) if d else 0
    return out, pop


def decode(words, d: int, b: int, n: int, counts_out, word: str = "int64", *,
           inv_scale: float = 1.0):
    """Summed field words (no header) -> ``counts_out`` (length d).  Returns (largest
    distance of a scaled float64 word from its integer, total of the counts, number of
    impossible words: a field above n, bits above the last field, a negative word)."""
    check_word(word)
    f = fields_per_word(b, word)
    words = np.ascontiguousarray(words)
    if word == "float64":
        return _fields.decode_fields(words, inv_scale, d, b, f, n, counts_out)
    c = np.empty(d, np.int64)
    if d:
        _cpu.unpack_count_fields(words, d, b, c)
    used = d - (data_words(d, b) - 1) * f if d else 0
    high = (words[-1] >> (used * b)) if d and used * b < 63 else 0
    counts_out[:] = c
    bad = int(((c > n) | (c < 0)).sum()) + int(high != 0) + int((words < 0).sum())
    return 0.0, int(c.sum()), bad


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
    _cpu.unpack_count_fields(np.ascontiguousarray(words), d, b, out)
    return out
