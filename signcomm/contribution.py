"""What one rank sends: its bits (S_R of eq. 8, or sign) and the bound R they use.

- ``Contribution``: S_R(v) with a per-segment R, or sign(v) whose exact zeros become
  fair coins of the rank's ZERO_COIN stream; a Byzantine rank sends the opposite bits.
  Randomness is the rank's own stream keyed by (seed, purpose, rank, step), at each
  coordinate's position (docs/algorithms.md, "Random streams").
- ``RPolicy``: R per segment (tensor) per step: ``"global"`` (the max over ranks of the
  segment's max |v|: one MAX-allreduce, normally carried by the step's agreement),
  ``"local"`` (this rank's max: no traffic, biased on heterogeneous data) or a fixed
  float (coordinates beyond it are clamped).  R = 0 (a segment of zeros) becomes 1:
  S_R(0) is a fair coin for any R > 0.
"""
from __future__ import annotations

import numba
import numpy as np

from . import kernels as K
from .kernels.ops import float_bit_view

R_POLICIES = ("global", "local")
KINDS = ("sr", "sign")


def safe_r(r):
    """R with the R = 0 guard: a segment whose bound is 0 holds only zeros, and S_R(0)
    is a fair coin for any R > 0, so R = 0 becomes 1 (fair coin flips)."""
    r = np.asarray(r, dtype=np.float64)
    return np.where(r == 0, 1.0, r)  # NaN stays NaN (a non-finite bound is an error)


@numba.njit(cache=True, nogil=True)
def _max_abs_bits(u, seg_sizes, mask, out):
    """out[s] = the largest ``u & mask`` over segment s of u, the float buffer's bit
    patterns (mask clears the sign bit): |x| orders like its pattern, and NaN patterns
    lie above Inf's, so one integer max (it vectorises) gives max |v| or a NaN."""
    start = 0
    for s in range(seg_sizes.shape[0]):
        us = u[start:start + seg_sizes[s]]
        m = mask ^ mask   # 0 of the mask's type
        for i in range(us.shape[0]):
            x = us[i] & mask
            m = x if x > m else m
        out[s] = m
        start += seg_sizes[s]


def local_max_abs(v, seg_sizes):
    """max |v| of each segment (NaN if the segment has a NaN; 0 for an empty segment)."""
    v = np.asarray(v)
    seg_sizes = np.asarray(seg_sizes, dtype=np.int64)
    if v.ndim == 1 and v.dtype in (np.float32, np.float64) and seg_sizes.ndim == 1 and \
            (seg_sizes >= 0).all() and int(seg_sizes.sum()) <= v.shape[0]:
        ut, mask, _ = float_bit_view(v.dtype)
        bits = np.zeros(seg_sizes.shape[0], ut)
        _max_abs_bits(v.view(ut), seg_sizes, mask, bits)
        return bits.view(v.dtype).astype(np.float64)   # a NaN pattern stays NaN
    out = np.zeros(seg_sizes.shape[0], np.float64)
    nonempty = seg_sizes > 0
    if nonempty.any():
        starts = np.concatenate([[0], np.cumsum(seg_sizes)[:-1]])[nonempty]
        a = np.abs(v.astype(np.float64) if v.dtype == np.float16 else v)
        out[nonempty] = np.maximum.reduceat(a, starts)
        nan = np.add.reduceat(np.isnan(a), starts) > 0
        out[np.flatnonzero(nonempty)[nan]] = np.nan
    return out


def shared_r(transport, local_max) -> np.ndarray:
    """Shared per-segment R on its own: the max over ranks of each segment's max |v|
    (one MAX allreduce), with the R = 0 guard of ``safe_r``."""
    from .comm import get_transport
    transport = get_transport(transport)
    local_max = np.ascontiguousarray(local_max, dtype=np.float64)
    with transport.ledger.kind("control"):
        return safe_r(transport.allreduce(local_max, "max"))


class RPolicy:
    """``RPolicy("global" | "local" | float | None)``; None: sign contributions, no R."""

    def __init__(self, R):
        if isinstance(R, bool) or not (R is None or R in R_POLICIES or isinstance(R, (int, float))):
            raise ValueError(f"R must be 'global', 'local' or a positive float, got {R!r}")
        if isinstance(R, (int, float)) and not (np.isfinite(R) and R > 0):
            raise ValueError(f"a fixed R must be positive and finite, got {R!r}")
        self.R = R

    @property
    def shared(self) -> bool:
        """True when R needs the max over ranks."""
        return self.R == "global"

    def resolve(self, local_max, global_max=None, *, transport=None):
        """Per-segment R from this rank's per-segment max |v| (None for sign).  Under
        "global", ``global_max`` is the max over ranks (from the step's agreement); if
        it is not given, one MAX-allreduce over ``transport`` computes it."""
        if self.R is None:
            return None
        if self.R == "global":
            if global_max is None:
                return shared_r(transport, local_max)
            return safe_r(global_max)
        if self.R == "local":
            return safe_r(local_max)
        return np.full(np.asarray(local_max).shape[0], float(self.R))


class Contribution:
    """This rank's packed bits: ``kind="sr"`` (S_R, eq. 8) or ``"sign"``."""

    def __init__(self, kind: str = "sr", *, seed: int = 0, rank: int = 0, invert: bool = False):
        if kind not in KINDS:
            raise ValueError(f"contribution must be one of {KINDS}, got {kind!r}")
        self.kind, self.seed, self.rank, self.invert = kind, int(seed), int(rank), bool(invert)

    def key(self, purpose: K.Purpose, step: int) -> int:
        """This rank's stream of ``purpose`` at ``step``."""
        return K.key64(self.seed, K.stream_id(purpose, self.rank), step)

    def pack(self, backend, v, step, *, r=None, seg_sizes=None, offset=0):
        """(packed bits, clamped count) of the flat native array ``v``: S_R with the
        per-segment ``r``, or sign(v) when ``r`` is None (always for ``kind="sign"``)."""
        d = v.shape[0]
        if self.kind == "sign" or r is None:
            packed, clamped = backend.sign_pack(v, self.key(K.Purpose.ZERO_COIN, step), offset), 0
        else:
            seg = np.array([d] if seg_sizes is None else seg_sizes, dtype=np.int64)
            packed, clamped = backend.sr_pack(v, r, seg, self.key(K.Purpose.STOCHASTIC_SIGN, step),
                                              offset)
        if self.invert:  # a Byzantine rank: sends the opposite of its signs
            packed = backend.invert(packed, d)
        return packed, int(clamped)
