"""The one-bit kernels in plain torch ops, on any torch device (CPU or CUDA).

Bit-identical to the numba kernels (``_cpu.py``, ``_step.py``) and their NumPy/CuPy twin
(``reference.py``); ``tests/test_torch_backend.py`` checks it.  Same conventions: bits as
in ``bits.py`` (little bit order, padding bits 0), random words as in ``rng.py``
(SplitMix64 of the global position ``offset + i``), keys are Python ints in [0, 2**64).

- ``sign_pack``: sign(x) packed, an exact 0 a coin of ``zero_key`` (or -1).
- ``stochastic_sign_pack``: S_R of eq. (8), +1 with probability (R + v) / (2R), decided as
  ``u < 0.5 + float64(v) * (0.5 / R)`` with u the top 53 random bits times 2**-53.
- ``decide_from_counts`` / ``majority_vote``: the v1 vote of eq. (10) (sign of 2c - n, a
  tie a shared coin or 0) and the v2 vote of eq. (11) (S_1: +1 with probability c / n,
  decided exactly in integers as ``u32 * n < c << 32``).
- ``momentum_pass`` / ``apply_signs``: the step around the vote, the momentum of eq. (9)
  (``torch.lerp``) and x <- x (* decay) + alpha * o.

torch has no usable uint64 arithmetic, so SplitMix64 runs in int64: multiplies and adds
wrap the same way mod 2**64, constants >= 2**63 are written as their negative int64, and
a logical right shift is an arithmetic one then a mask.  No ``.numpy()``, no host syncs
but the ones that return a Python int (counts of non-finite, clamped, max bits).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import rng
from .bits import check_packed, packed_nbytes

MASK64 = (1 << 64) - 1


def _s64(u: int) -> int:
    """The int64 holding the uint64 bit pattern u (mod 2**64)."""
    u = int(u) & MASK64
    return u - (1 << 64) if u >= (1 << 63) else u


GOLDEN = _s64(rng.GOLDEN)
MIX1 = _s64(rng.MIX1)
MIX2 = _s64(rng.MIX2)
TWO_M53 = 2.0 ** -53
_SHIFTS8 = (0, 1, 2, 3, 4, 5, 6, 7)
COUNT_ROWS = 8  # rows unpacked at once by counts(): 8 d bytes, as much as the int64 counts

MODE_LERP, MODE_COPY, MODE_SCALE = 0, 1, 2   # as _step
MODE_V1_COIN, MODE_V1_ZERO, MODE_V2 = 0, 1, 2  # as _cpu.decide_from_counts


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of the int64 bit patterns z by 0 < k < 64."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _xor_srl_(z: torch.Tensor, k: int) -> torch.Tensor:
    """z ^= z >>> k (logical shift), in place, one temporary."""
    t = z >> k
    t &= (1 << (64 - k)) - 1
    z ^= t
    return z


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser, in place on the fresh int64 tensor z."""
    _xor_srl_(z, 30)
    z *= MIX1
    _xor_srl_(z, 27)
    z *= MIX2
    return _xor_srl_(z, 31)


def _positions(d: int, offset: int, device) -> torch.Tensor:
    return torch.arange(int(offset), int(offset) + int(d), dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------
# random bits (rng.py)


def random_words(key: int, positions: torch.Tensor) -> torch.Tensor:
    """rng.random_words: the uint64 word of each position, as its int64 bit pattern."""
    z = positions.to(torch.int64) + 1
    z *= GOLDEN
    z += _s64(key)
    return _mix(z)


def uniform53(key: int, positions: torch.Tensor) -> torch.Tensor:
    """rng.uniform: the top 53 bits of each word times 2**-53 (float64 in [0, 1))."""
    return _srl(random_words(key, positions), 11).to(torch.float64) * TWO_M53


def coin_bits(key: int, positions: torch.Tensor) -> torch.Tensor:
    """rng.coin_bits: the top bit of each word (bool)."""
    return random_words(key, positions) < 0


def tie_coin_bits(key: int, positions: torch.Tensor) -> torch.Tensor:
    """rng.tie_coin_bits: bit p % 64 of the word at position p // 64 (bool)."""
    p = positions.to(torch.int64)
    return ((random_words(key, p >> 6) >> (p & 63)) & 1).to(torch.bool)


def _tie_coins_contiguous(key: int, d: int, offset: int, device) -> torch.Tensor:
    """tie_coin_bits of positions offset .. offset + d - 1: one SplitMix64 per 64
    positions, its 64 bits spread in order."""
    q0 = int(offset) >> 6
    nw = (int(offset) + d + 63) // 64 - q0
    words = random_words(key, torch.arange(q0, q0 + nw, dtype=torch.int64, device=device))
    lanes = torch.arange(64, dtype=torch.int64, device=device)
    coins = ((words.unsqueeze(1) >> lanes) & 1).to(torch.bool).reshape(-1)
    s = int(offset) & 63
    return coins[s:s + d]


# ---------------------------------------------------------------------------------------
# packing (bits.py)


_nbytes = packed_nbytes
_check_packed = check_packed  # bits.py's, which takes torch tensors too


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool (or 0/1) vector of length d -> ceil(d / 8) packed bytes, little bit order,
    padding bits 0."""
    if flags.ndim != 1:
        raise ValueError(f"flags must be 1-D, got shape {tuple(flags.shape)}")
    d = flags.shape[0]
    nb = _nbytes(d)
    f = flags.to(torch.bool).to(torch.uint8)
    if nb * 8 != d:
        f = torch.cat([f, f.new_zeros(nb * 8 - d)])
    shifts = torch.tensor(_SHIFTS8, dtype=torch.uint8, device=flags.device)
    return (f.view(nb, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_range(packed: torch.Tensor, start: int, m: int) -> torch.Tensor:
    """Bits start .. start + m - 1 of a packed vector, as a bool tensor."""
    b0 = start >> 3
    b1 = (start + m + 7) >> 3
    shifts = torch.tensor(_SHIFTS8, dtype=torch.uint8, device=packed.device)
    bits = (packed[b0:b1].unsqueeze(1) >> shifts) & 1
    s = start & 7
    return bits.reshape(-1)[s:s + m].to(torch.bool)


def unpack_bits(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Packed bytes -> bool tensor of length d."""
    _check_packed(packed, d)
    return _unpack_range(packed, 0, int(d))


# ---------------------------------------------------------------------------------------
# sign and S_R (eq. 8), fused with packing in the numba kernels


def _check_float_vector(x: torch.Tensor, name: str) -> None:
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat (1-D) tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")


def sign_pack(x: torch.Tensor, zero_key: Optional[int] = None,
              offset: int = 0) -> Tuple[torch.Tensor, int]:
    """sign(x) packed: bit = x > 0; an exact 0 (either sign) is the coin of ``zero_key``
    at position offset + i when given, else bit 0; NaN packs as 0.  Returns (packed,
    number of non-finite inputs).  When x has a zero, the coins of all d positions are
    drawn (one SplitMix64 each) and selected where x == 0: no second host sync."""
    _check_float_vector(x, "x")
    bits = x > 0  # fp16/bf16 compare as their exact fp32 widening would
    zeros = x == 0
    nbad, nzero = torch.stack([(~torch.isfinite(x)).sum(), zeros.sum()]).tolist()
    if zero_key is not None and nzero:
        bits |= zeros & coin_bits(zero_key, _positions(x.shape[0], offset, x.device))
    return pack_bits(bits), int(nbad)


def _segments_r(d: int, r, seg_sizes, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R per segment, segment sizes) as float64 / int64 tensors on ``device``, checked as
    ops._segments checks them (host-side values are checked; a device tensor is taken
    as given, to avoid a sync)."""
    def host_or_device(a, dtype):
        if isinstance(a, torch.Tensor):
            t = a.to(device=device, dtype=dtype).reshape(-1)
            return t, (t.tolist() if a.device.type == "cpu" else None)
        t = torch.as_tensor(a, dtype=dtype).reshape(-1)  # list, NumPy array or scalar
        return t.to(device), t.tolist()

    rt, r_host = host_or_device(r, torch.float64)
    if seg_sizes is None:
        if rt.shape[0] != 1:
            raise ValueError(f"{rt.shape[0]} values of R given without seg_sizes")
        seg_sizes = [d]
    st, s_host = host_or_device(seg_sizes, torch.int64)
    if st.shape[0] != rt.shape[0]:
        raise ValueError(f"R has {rt.shape[0]} values but there are {st.shape[0]} segments")
    if s_host is not None and (min(s_host, default=0) < 0 or sum(s_host) != d):
        raise ValueError(f"segment sizes must be >= 0 and sum to d={d}, got sum {sum(s_host)}")
    if r_host is not None:
        for s, a in enumerate(r_host):
            if not (a > 0 and a < float("inf")):
                raise ValueError(f"R must be positive and finite; segment {s} has R={a!r}")
    return rt, st


def stochastic_sign_pack(v: torch.Tensor, r, seg_sizes, key: int,
                         offset: int = 0) -> Tuple[torch.Tensor, int, int]:
    """S_R of eq. (8) packed: bit i = u_i < 0.5 + float64(v_i) * (0.5 / R_s), u_i the top
    53 bits of the word of ``key`` at offset + i times 2**-53, R_s the bound of the
    segment holding i (``r`` one float64 per segment, ``seg_sizes`` their lengths, None
    for one segment).  Returns (packed, non-finite count, count of |v_i| > R_s)."""
    _check_float_vector(v, "v")
    d = v.shape[0]
    rt, st = _segments_r(d, r, seg_sizes, v.device)
    v64 = v.to(torch.float64)  # exact for fp16/bf16/fp32
    r_each = torch.repeat_interleave(rt, st, output_size=d)
    half_each = torch.repeat_interleave(0.5 / rt, st, output_size=d)
    p = v64 * half_each
    p += 0.5  # two roundings, as numba's 0.5 + x * hs (no contraction to an fma)
    bits = uniform53(key, _positions(d, offset, v.device)) < p
    nbad, clamped = torch.stack([(~torch.isfinite(v64)).sum(),
                                 (v64.abs() > r_each).sum()]).tolist()
    return pack_bits(bits), int(nbad), int(clamped)


# ---------------------------------------------------------------------------------------
# the vote: counts, v1 (eq. 10), v2 S_1 (eq. 11)


def _check_gathered(gathered: torch.Tensor, d: int) -> None:
    if gathered.ndim != 2:
        raise ValueError(f"gathered must be 2-D (n ranks, bytes), got shape "
                         f"{tuple(gathered.shape)}")
    if gathered.shape[0] < 1:
        raise ValueError("gathered must hold at least one rank's vector (n >= 1)")
    _check_packed(gathered, d, "gathered")


def counts(gathered: torch.Tensor, d: int) -> torch.Tensor:
    """Per-coordinate number of rows with bit 1 (int64, length d), over the n rows of
    ``gathered`` (n, >= ceil(d / 8)) uint8: the rows are unpacked to one byte per bit
    COUNT_ROWS at a time and summed (temporaries of about 2 * 8 d bytes)."""
    _check_gathered(gathered, d)
    d = int(d)
    nb = _nbytes(d)
    n = gathered.shape[0]
    shifts = torch.tensor(_SHIFTS8, dtype=torch.uint8, device=gathered.device)
    acc = None
    for r0 in range(0, n, COUNT_ROWS):
        rows = gathered[r0:r0 + COUNT_ROWS, :nb]
        part = ((rows.unsqueeze(2) >> shifts) & 1).sum(dim=0, dtype=torch.int64)
        acc = part if acc is None else acc.add_(part)
    return acc.reshape(-1)[:d]


def decide_from_counts(c: torch.Tensor, n: int, mode: int, key: Optional[int],
                       offset: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The packed vote from counts c (0 <= c <= n), as ``_cpu.decide_from_counts`` and
    ``ops.vote_from_counts``: mode 0 v1 (bit = 2c > n, a tie 2c = n the shared tie coin
    of ``key``), 1 v1 with tie zero (bit 0, and the nonzero mask, returned for even n
    only), 2 v2 S_1 (bit = u32 * n < c << 32, u32 the top 32 bits of the word of ``key``
    at offset + i).  Returns (bits, nonzero or None)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if mode not in (MODE_V1_COIN, MODE_V1_ZERO, MODE_V2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode!r}")
    if mode != MODE_V1_ZERO and key is None:
        raise ValueError(f"mode {mode} draws shared random bits: pass key")
    if c.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(c.shape)}")
    c = c.to(torch.int64)
    d = c.shape[0]
    nonzero = None
    if mode == MODE_V2:
        u32 = _srl(random_words(key, _positions(d, offset, c.device)), 32)
        bits = u32 * n < (c << 32)  # int64, wrapping like _cpu for n >= 2**31
    else:
        bits = 2 * c > n
        if n % 2 == 0:  # odd n never ties
            tie = 2 * c == n
            if mode == MODE_V1_COIN:
                bits |= tie & _tie_coins_contiguous(key, d, offset, c.device)
            else:
                nonzero = pack_bits(~tie)
    return pack_bits(bits), nonzero


def majority_vote(gathered: torch.Tensor, d: int, mode: int, key: Optional[int],
                  offset: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The vote over the n packed rows of ``gathered`` (modes as ``decide_from_counts``),
    the same bits as ``ops.majority_vote`` (v1 coin / zero) and ``_cpu.vote_s1`` (v2)."""
    return decide_from_counts(counts(gathered, d), gathered.shape[0], mode, key, offset)


# ---------------------------------------------------------------------------------------
# count fields for the packed-count allreduce


def _check_field_bits(bits_per_field: int) -> int:
    b = int(bits_per_field)
    if not 1 <= b <= 63:
        raise ValueError(f"bits_per_field must be in [1, 63], got {bits_per_field}")
    return b


def pack_count_fields(packed: torch.Tensor, d: int, bits_per_field: int) -> torch.Tensor:
    """One bit per coordinate -> int64 words of 63 // b fields of b bits (coordinate
    wF + f at bit f * b of word w), as ``_cpu.pack_count_fields``."""
    _check_packed(packed, d)
    b = _check_field_bits(bits_per_field)
    d = int(d)
    per_word = 63 // b
    nwords = -(-d // per_word)
    bits = unpack_bits(packed, d).to(torch.int64)
    if nwords * per_word != d:
        bits = torch.cat([bits, bits.new_zeros(nwords * per_word - d)])
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * b
    return (bits.view(nwords, per_word) << shifts).sum(dim=1)


def unpack_count_fields(words: torch.Tensor, d: int, bits_per_field: int) -> torch.Tensor:
    """Summed field words -> per-coordinate counts (int64, length d)."""
    b = _check_field_bits(bits_per_field)
    d = int(d)
    per_word = 63 // b
    need = -(-d // per_word)
    if words.ndim != 1 or words.shape[0] < need:
        raise ValueError(f"words must be 1-D with at least {need} entries for d={d}, "
                         f"got shape {tuple(words.shape)}")
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * b
    fields = (words[:need].to(torch.int64).unsqueeze(1) >> shifts) & ((1 << b) - 1)
    return fields.reshape(-1)[:d]


# ---------------------------------------------------------------------------------------
# the optimizer step around the vote (_step.py)


def _max_abs_bits(x: torch.Tensor) -> torch.Tensor:
    """max over x of the fp32 bit pattern of |x| (0-dim int32 tensor; 0 when empty)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=x.device)
    x32 = x if x.dtype == torch.float32 else x.to(torch.float32)
    return (x32.contiguous().view(torch.int32) & 0x7FFFFFFF).max()


def momentum_pass(v: torch.Tensor, g: torch.Tensor, out: torch.Tensor, w: float,
                  mode: int) -> Tuple[int, int]:
    """The momentum of eq. (9) into ``out``: torch.lerp(v, g, w) (mode 0), g (mode 1)
    or g * w (mode 2); ``v`` is read only in mode 0.  Returns (max |g|, max |out|) as
    fp32 bit patterns (Python ints): >= 0x7F800000 means a NaN/Inf is present.  Mode 0
    is whatever the device's lerp kernel rounds to: _step's fused kernel reproduces
    torch's CPU lerp where that is an FMA (checked on CPU; on CUDA not checked here)."""
    if mode == MODE_LERP:
        torch.lerp(v, g, float(w), out=out)
    elif mode == MODE_COPY:
        out.copy_(g)
    elif mode == MODE_SCALE:
        torch.mul(g, float(w), out=out)
    else:
        raise ValueError(f"mode must be 0 (lerp), 1 (copy) or 2 (scale), got {mode!r}")
    gm, vm = torch.stack([_max_abs_bits(g), _max_abs_bits(out)]).tolist()
    return int(gm), int(vm)


def _values_range(bits: torch.Tensor, nonzero: Optional[torch.Tensor], start: int, m: int,
                  dtype) -> torch.Tensor:
    o = _unpack_range(bits, start, m).to(dtype) * 2 - 1
    if nonzero is not None:
        o *= _unpack_range(nonzero, start, m).to(dtype)
    return o


def values(bits: torch.Tensor, nonzero: Optional[torch.Tensor], d: int,
           dtype=torch.float32) -> torch.Tensor:
    """The vote as +1 / -1 floats of length d, times the nonzero bit when a mask is
    given (a tie under tie "zero" is -0.0 or +0.0), as ``ops.Vote.values``."""
    _check_packed(bits, d, "bits")
    if nonzero is not None:
        _check_packed(nonzero, d, "nonzero")
    return _values_range(bits, nonzero, 0, int(d), dtype)


def apply_signs(x: torch.Tensor, bits: torch.Tensor, start: int, alpha: float,
                nonzero: Optional[torch.Tensor] = None,
                decay: Optional[float] = None) -> torch.Tensor:
    """In place on the flat tensor x, which holds coordinates start .. start + len(x) - 1
    of the packed vote: ``x.mul_(decay)`` (if given), then ``x.add_(o, alpha=alpha)``
    with o the vote's values in x's dtype.  Returns x."""
    if x.ndim != 1:
        raise ValueError(f"x must be a flat (1-D) tensor, got shape {tuple(x.shape)}")
    start = int(start)
    m = x.shape[0]
    _check_packed(bits, start + m, "bits")
    if nonzero is not None:
        _check_packed(nonzero, start + m, "nonzero")
    o = _values_range(bits, nonzero, start, m, x.dtype)
    if decay is not None:
        x.mul_(decay)
    x.add_(o, alpha=alpha)
    return x
