"""The one-bit convention, stated once.

Coordinate ``i`` of a flat vector of length ``d`` lives in byte ``i // 8``, bit ``i % 8``
(little-endian within the byte, NumPy's ``bitorder="little"``).  Bit 1 means +1, bit 0
means -1.  A packed vector has ``ceil(d / 8)`` bytes; the padding bits of the last byte
are 0 and never change a result (every kernel that produces packed bytes clears them).
"""
from __future__ import annotations

import numpy as np

from .xp import array_module

BITORDER = "little"


def packed_nbytes(d: int) -> int:
    """Bytes needed for ``d`` one-bit coordinates."""
    d = int(d)
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    return (d + 7) // 8


_UINT8 = np.dtype(np.uint8)


def check_packed(packed, d: int, name: str = "packed") -> None:
    """Raise a clear error when ``packed`` cannot hold ``d`` coordinates."""
    if packed.dtype is not _UINT8 and str(packed.dtype) not in ("uint8", "torch.uint8"):
        # (NumPy and CuPy share NumPy's uint8 dtype object; torch's is named "torch.uint8")
        raise TypeError(f"{name} must be uint8, got {packed.dtype}")
    need = packed_nbytes(d)
    if packed.shape[-1] < need:
        raise ValueError(
            f"{name} has {packed.shape[-1]} bytes, too short for d={d} (needs {need})")


def padding_mask(d: int) -> int:
    """Mask of the valid bits in the last byte of a packed vector of length d."""
    r = d % 8
    return 0xFF if r == 0 else (1 << r) - 1


def clear_padding(packed, d: int):
    """Zero the padding bits of the last byte (in place); returns ``packed``."""
    if d % 8 and packed.shape[-1]:
        packed[..., packed_nbytes(d) - 1] &= packed.dtype.type(padding_mask(d))
    return packed


def unpack_signs(packed, d: int, dtype=np.float32):
    """Packed bits -> array of +1/-1 of length ``d`` (NumPy or CuPy, like the input)."""
    xp = array_module(packed)
    check_packed(packed, d)
    bits = xp.unpackbits(packed[: packed_nbytes(d)], bitorder=BITORDER)[:d]
    return bits.astype(dtype) * 2 - 1


def unpack_bits(packed, d: int):
    """Packed bits -> bool array of length ``d``."""
    xp = array_module(packed)
    check_packed(packed, d)
    return xp.unpackbits(packed[: packed_nbytes(d)], bitorder=BITORDER)[:d].astype(bool)


def pack_bits(bits):
    """Bool (or 0/1) array -> packed bytes, padding cleared."""
    xp = array_module(bits)
    # astype: cupy.packbits returns an empty input unchanged (bool), NumPy gives uint8
    return xp.packbits(xp.asarray(bits, dtype=bool), bitorder=BITORDER).astype(
        xp.uint8, copy=False)
