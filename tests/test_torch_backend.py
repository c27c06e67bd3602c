"""The pure-torch backend (``signcomm.kernels.torch_ops``) against the numba and NumPy
kernels, bit for bit: random words and coins (``rng``), packing (``bits``), sign and S_R
(eq. 8), counts and the v1 / v2 votes (eqs. 10, 11), count fields (``ops`` / ``_cpu``),
the momentum pass (eq. 9) and the update (``_step``).

Inputs are awkward on purpose: sizes that are not multiples of 8 or 64, unaligned
offsets, exact zeros of both signs, |v| > R, NaN/Inf, fp16/bf16/fp32/fp64, ties.  The
planted-bug cases check that these comparisons do fail on a wrong kernel (v / R instead
of v / (2R), a shifted position, a per-position tie coin, an unfused lerp).  The GPU test
runs the same parity suite on CUDA tensors against the CPU kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from signcomm.kernels import _cpu, _step, ops, rng
from signcomm.kernels import bits as B
from signcomm.kernels import torch_ops as T

SIZES = [0, 1, 7, 63, 64, 65, 1000]
BIG = 1_000_003
OFFSETS = [0, 13, 100]
NS = [1, 2, 3, 4, 5, 8]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MODES = {0: ("v1", "coin"), 1: ("v1", "zero"), 2: ("v2", "coin")}
KEY = rng.key64(11, rng.stream_id(rng.Purpose.TIE_COIN), 5)
SR_KEY = rng.key64(11, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 3), 5)
EDGE_KEYS = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, KEY]


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU NumPy copy of t; bf16 (which NumPy lacks) widens exactly to fp32."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _same(got, want) -> bool:
    """Same shape, dtype-free bit-for-bit equality (floats compared by their bits, so
    -0.0 != +0.0 and NaN payloads count)."""
    a, b = _np(got) if isinstance(got, torch.Tensor) else np.asarray(got), np.asarray(want)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        if a.dtype != b.dtype:
            return False
        return a.tobytes() == b.tobytes()
    return np.array_equal(a.astype(np.int64) if a.dtype != np.uint64 else a.view(np.int64),
                          b.astype(np.int64) if b.dtype != np.uint64 else b.view(np.int64))


def _vote_same(got, want: ops.Vote) -> bool:
    bits, nonzero = got
    if (nonzero is None) != (want.nonzero is None):
        return False
    return _same(bits, want.bits) and (nonzero is None or _same(nonzero, want.nonzero))


def _floats(gen, d, dtype, zero_frac=0.15, specials=True, scale_exp=(-3, 4)):
    """d floats of mixed magnitudes in ``dtype`` with exact +0.0 / -0.0 and (optionally)
    NaN, +Inf, -Inf at a few places."""
    x = gen.standard_normal(d) * 10.0 ** gen.integers(*scale_exp, d)
    z = gen.random(d) < zero_frac
    x[z] = np.where(gen.random(int(z.sum())) < 0.5, 0.0, -0.0)
    if specials and d >= 7:
        x[gen.choice(d, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    return torch.from_numpy(x).to(dtype)


def _gathered(gen, n, d, extra=3):
    """n packed rows with random padding bits and a few trailing bytes (which the kernels
    must ignore), biased so that ties are common."""
    nb = (d + 7) // 8
    return gen.integers(0, 256, (n, nb + extra), dtype=np.uint8)


def _cpu_sign_nbad(xn, zero_key, offset):
    out = np.empty(B.packed_nbytes(xn.shape[0]), np.uint8)
    xc = ops._cpu_float(xn)
    ut, mask, inf_bits = ops.float_bit_view(xc.dtype)
    return int(_cpu.sign_pack(xc, xc.view(ut), mask, inf_bits, out, np.uint64(zero_key or 0),
                              zero_key is not None, offset))


# ---------------------------------------------------------------------------------------
# random words, coins


@pytest.mark.parametrize("key", EDGE_KEYS)
def test_random_words_and_coins(key):
    gen = np.random.default_rng(key % 1000)
    pos = np.concatenate([np.arange(300), gen.integers(0, 2**62, 300),
                          [2**62, 2**63 - 1 - 64, 12345678901]]).astype(np.uint64)
    pt = torch.from_numpy(pos.astype(np.int64))
    words = T.random_words(key, pt)
    assert words.dtype == torch.int64
    assert _same(words, rng.random_words(key, pos).view(np.int64))
    u = T.uniform53(key, pt)
    assert u.dtype == torch.float64 and _same(u, rng.uniform(key, pos))
    assert _same(T.coin_bits(key, pt), rng.coin_bits(key, pos))
    tie_pos = pos[pos < 2**63 - 64]
    assert _same(T.tie_coin_bits(key, torch.from_numpy(tie_pos.astype(np.int64))),
                 rng.tie_coin_bits(key, tie_pos))


def test_contiguous_tie_coins():
    for d in SIZES:
        for offset in OFFSETS + [64, 127]:
            want = rng.tie_coin_bits(KEY, np.arange(offset, offset + d, dtype=np.uint64))
            assert _same(T._tie_coins_contiguous(KEY, d, offset, "cpu"), want), (d, offset)


# ---------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("d", SIZES + [BIG])
def test_pack_unpack(d):
    gen = np.random.default_rng(d)
    flags = gen.random(d) < 0.5
    packed = T.pack_bits(torch.from_numpy(flags))
    assert packed.dtype == torch.uint8 and _same(packed, B.pack_bits(flags))
    dirty = gen.integers(0, 256, B.packed_nbytes(d) + 2, dtype=np.uint8)  # padding set
    assert _same(T.unpack_bits(torch.from_numpy(dirty), d), B.unpack_bits(dirty, d))
    assert _same(T.unpack_bits(packed, d), flags)
    with pytest.raises(ValueError):
        T.unpack_bits(torch.zeros(max(0, B.packed_nbytes(d) - 1), dtype=torch.uint8), d + 8)


# ---------------------------------------------------------------------------------------
# sign and S_R (eq. 8)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", SIZES)
def test_sign_pack(dtype, d):
    x = _floats(np.random.default_rng(d), d, dtype)
    xn = x.numpy() if dtype != torch.bfloat16 else _np(x)
    for offset in (0, 13):
        for zero_key in (None, KEY):
            packed, nbad = T.sign_pack(x, zero_key, offset)
            want = ops.pack_signs(xn, zero_key=zero_key, offset=offset, check_finite=False)
            assert _same(packed, want), (offset, zero_key)
            assert nbad == int((~np.isfinite(xn)).sum())
    assert nbad == _cpu_sign_nbad(xn, KEY, 13)  # the numba kernel's own count


def test_sign_pack_big():
    x = _floats(np.random.default_rng(1), BIG, torch.float32, zero_frac=0.01)
    packed, nbad = T.sign_pack(x, KEY, 100)
    assert _same(packed, ops.pack_signs(x.numpy(), zero_key=KEY, offset=100,
                                        check_finite=False))
    assert nbad == 3


def _segments(gen, d, nseg):
    """nseg segment sizes summing to d, one of them empty when nseg > 2, and their R."""
    cuts = np.sort(gen.integers(0, d + 1, nseg - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [d]])).astype(np.int64)
    if nseg > 2:
        sizes[1] += sizes[0]
        sizes[0] = 0
    r = np.array([0.5, 2.0, 1e-3, 7.0, 0.3][:nseg], np.float64)
    return sizes, r


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", SIZES)
def test_stochastic_sign_pack(dtype, d):
    gen = np.random.default_rng(7 * d)
    v = _floats(gen, d, dtype, scale_exp=(-3, 1))  # |v| > R for some, R = 1e-3 .. 7
    vn = v.numpy() if dtype != torch.bfloat16 else _np(v)
    for offset, nseg in [(0, 1), (100, 1), (0, 3), (13, 3)]:
        sizes, r = _segments(gen, d, nseg)
        # R as a list, a NumPy array or a float64 tensor; sizes as NumPy or a tensor
        r_arg = [r.tolist(), r, torch.from_numpy(r)][(d + offset) % 3]
        s_arg = torch.from_numpy(sizes) if (d + nseg) % 2 else sizes
        packed, nbad, clamped = T.stochastic_sign_pack(v, r_arg, s_arg, SR_KEY, offset)
        want, want_clamped = ops.stochastic_sign_pack(vn, r, SR_KEY, seg_sizes=sizes,
                                                      offset=offset, check_finite=False)
        assert _same(packed, want), (offset, nseg)
        assert clamped == want_clamped
        assert nbad == int((~np.isfinite(vn)).sum())
        if d >= 7:
            assert clamped > 0 and nbad == 3


def test_stochastic_sign_pack_big_and_one_r():
    gen = np.random.default_rng(3)
    v = _floats(gen, BIG, torch.float32, specials=False, scale_exp=(-2, 1))
    sizes, r = _segments(gen, BIG, 2)
    packed, nbad, clamped = T.stochastic_sign_pack(v, r, sizes, SR_KEY, 13)
    want, want_clamped = ops.stochastic_sign_pack(v.numpy(), r, SR_KEY, seg_sizes=sizes,
                                                  offset=13)
    assert _same(packed, want) and clamped == want_clamped and nbad == 0
    p1, _, c1 = T.stochastic_sign_pack(v[:1000], 0.25, None, SR_KEY)
    w1, wc1 = ops.stochastic_sign_pack(v[:1000].numpy(), 0.25, SR_KEY)
    assert _same(p1, w1) and c1 == wc1


@pytest.mark.parametrize("r,sizes", [([1.0, 2.0], None), ([1.0], [5, 5]), ([0.0], [10]),
                                     ([float("nan")], [10]), ([1.0, 1.0], [4, 5])])
def test_stochastic_sign_pack_checks(r, sizes):
    with pytest.raises(ValueError):
        T.stochastic_sign_pack(torch.zeros(10), r, sizes, SR_KEY)


# ---------------------------------------------------------------------------------------
# counts and the votes (eqs. 10, 11)


@pytest.mark.parametrize("n", NS + [17])
def test_counts(n):
    for d in SIZES:
        g = _gathered(np.random.default_rng(n * 1000 + d), n, d)
        c = T.counts(torch.from_numpy(g), d)
        assert c.dtype == torch.int64
        assert _same(c, ops.vote_counts(g, d)), d


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", NS)
def test_decide_from_counts(mode, n):
    variant, tie = MODES[mode]
    for d in SIZES:
        gen = np.random.default_rng(mode * 100000 + n * 1000 + d)
        c = gen.integers(0, n + 1, d)
        c[gen.random(d) < 0.3] = n // 2  # many ties for even n
        for offset in (0, 13):
            got = T.decide_from_counts(torch.from_numpy(c), n, mode, KEY, offset)
            want = ops.vote_from_counts(c, n, variant=variant, tie=tie, key=KEY,
                                        offset=offset)
            assert _vote_same(got, want), (d, offset)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", [255, 256, 1000, 2**31 - 1, 2**31 + 5, 2**40 + 2])
def test_decide_from_counts_large_n(mode, n):
    """n >= 2**31 takes _cpu's signed 64-bit S_1 branch (wrapping for huge n)."""
    gen = np.random.default_rng(n % 997 + mode)
    c = gen.integers(0, n + 1, 1000, dtype=np.int64)
    c[::5] = n // 2
    c[::7] = n
    variant, tie = MODES[mode]
    got = T.decide_from_counts(torch.from_numpy(c), n, mode, KEY, 100)
    assert _vote_same(got, ops.vote_from_counts(c, n, variant=variant, tie=tie, key=KEY,
                                                offset=100))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", NS)
def test_majority_vote(mode, n):
    variant, tie = MODES[mode]
    for d in SIZES:
        for offset in OFFSETS:
            g = _gathered(np.random.default_rng(n * 1000 + d + 7 * offset), n, d)
            got = T.majority_vote(torch.from_numpy(g), d, mode, KEY, offset)
            want = ops.majority_vote(g, d, variant=variant, tie=tie, key=KEY, offset=offset)
            assert _vote_same(got, want), (d, offset)


@pytest.mark.parametrize("n", [3, 4])
def test_majority_vote_big(n):
    g = _gathered(np.random.default_rng(n), n, BIG)
    gt = torch.from_numpy(g)
    for mode, (variant, tie) in MODES.items():
        got = T.majority_vote(gt, BIG, mode, KEY, 13)
        assert _vote_same(got, ops.majority_vote(g, BIG, variant=variant, tie=tie, key=KEY,
                                                 offset=13))


def test_majority_vote_many_rows():
    """More rows than counts() unpacks at once, and v2 with n >= 256 (ops counts first)."""
    for n in (T.COUNT_ROWS * 2 + 3, 300):
        g = _gathered(np.random.default_rng(n), n, 1000)
        for mode, (variant, tie) in MODES.items():
            got = T.majority_vote(torch.from_numpy(g), 1000, mode, KEY, 5)
            assert _vote_same(got, ops.majority_vote(g, 1000, variant=variant, tie=tie,
                                                     key=KEY, offset=5))


# ---------------------------------------------------------------------------------------
# count fields


@pytest.mark.parametrize("b", [1, 2, 3, 7, 21, 63])
def test_count_fields(b):
    for d in SIZES:
        _check_count_fields(b, d)


def _check_count_fields(b, d):
    gen = np.random.default_rng(b * 1000 + d)
    nranks = min(3, 2**b - 1)  # field totals stay below 2**b
    rows = _gathered(gen, nranks, d)
    words = [T.pack_count_fields(torch.from_numpy(row), d, b) for row in rows]
    for w, row in zip(words, rows):
        assert w.dtype == torch.int64 and _same(w, ops.pack_count_fields(row, d, b))
    total = torch.stack(words).sum(0)
    got = T.unpack_count_fields(total, d, b)
    assert got.dtype == torch.int64
    assert _same(got, ops.unpack_count_fields(total.numpy(), d, b))
    assert _same(got, ops.vote_counts(rows, d))


# ---------------------------------------------------------------------------------------
# the step: momentum (eq. 9) and the update


def _fused_lerp_ok() -> bool:
    """Whether _step's fused lerp equals this torch build's CPU lerp (it does where torch's
    vectorised lerp is an FMA); only then is torch.lerp compared with _step."""
    from signcomm.backends import fused_lerp_ok
    return fused_lerp_ok()


def _momentum_data(d, seed):
    g = np.random.default_rng(seed)
    scale = 10.0 ** g.integers(-4, 5, d)
    return (torch.from_numpy((g.standard_normal(d) * scale).astype(np.float32)),
            torch.from_numpy((g.standard_normal(d) * scale).astype(np.float32)))


@pytest.mark.parametrize("mode", [T.MODE_LERP, T.MODE_COPY, T.MODE_SCALE])
@pytest.mark.parametrize("d", SIZES + [_step.PARALLEL_MIN + 13])
def test_momentum_pass(mode, d):
    if mode == T.MODE_LERP and not _fused_lerp_ok():
        pytest.skip("this torch build's CPU lerp is not the fused kernel _step reproduces")
    for w in (0.1, 0.5, 0.9):
        v, g = _momentum_data(d, d + int(10 * w))
        if d > 5:
            g[3] = torch.tensor(np.uint32(0x7FC01234).view(np.float32))  # NaN with a payload
            v[4] = float("inf")
        out = torch.full((d,), float("nan"))
        got = T.momentum_pass(v, g, out, w, mode)
        ref = np.full(d, np.nan, np.float32)
        want = _step.momentum_pass(v.numpy(), g.numpy(), ref, w, mode)
        assert _same(out, ref), w
        assert got == (int(want[0]), int(want[1])) and all(type(a) is int for a in got)
        if d > 5:
            assert got[0] > 0x7F800000


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("n", [3, 4])
def test_values(d, n):
    g = _gathered(np.random.default_rng(d + n), n, d)
    bits, nonzero = T.majority_vote(torch.from_numpy(g), d, 1, None)
    vote = ops.Vote(bits.numpy(), None if nonzero is None else nonzero.numpy())
    for dtype, np_dtype in [(torch.float32, np.float32), (torch.float64, np.float64)]:
        assert _same(T.values(bits, nonzero, d, dtype), vote.values(d, np_dtype))
    assert _same(T.values(bits, None, d), ops.Vote(bits.numpy()).values(d))


@pytest.mark.parametrize("m,start", [(m, s) for m in (1, 7, 64, 1000) for s in (0, 3, 13, 100)]
                         + [(_step.PARALLEL_MIN + 5, 0), (_step.PARALLEL_MIN + 5, 13)])
def test_apply_signs_fp32(m, start):
    for decay in (None, 0.999):
        for mask in (False, True):
            _check_apply_signs_fp32(m, start, decay, mask)


def _check_apply_signs_fp32(m, start, decay, mask):
    gen = np.random.default_rng(m + start)
    x = gen.standard_normal(m).astype(np.float32)
    x[: min(4, m)] = np.array([0.0, -0.0, 1e-30, -1.0], np.float32)[: min(4, m)]
    d = start + m + 5
    bits = gen.integers(0, 256, B.packed_nbytes(d), dtype=np.uint8)
    nz = gen.integers(0, 256, B.packed_nbytes(d), dtype=np.uint8) if mask else None
    lr = 0.0123
    want = x.copy()
    _step.apply_signs(want, bits, start, np.float32(-lr), nonzero=nz, decay=decay)
    xt = torch.from_numpy(x.copy())
    out = T.apply_signs(xt, torch.from_numpy(bits), start, -lr,
                        nonzero=None if nz is None else torch.from_numpy(nz), decay=decay)
    assert out is xt and _same(xt, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("start", [0, 13])
@pytest.mark.parametrize("mask", [False, True])
def test_apply_signs_other_dtypes(dtype, start, mask):
    """Not fp32: the same as torch's mul_ / add_ on the vote decoded by ops.Vote."""
    gen = np.random.default_rng(start + mask)
    m, d = 1000, start + 1003
    x = torch.from_numpy(gen.standard_normal(m)).to(dtype)
    bits = gen.integers(0, 256, B.packed_nbytes(d), dtype=np.uint8)
    nz = gen.integers(0, 256, B.packed_nbytes(d), dtype=np.uint8) if mask else None
    o = torch.from_numpy(ops.Vote(bits, nz).values(d, np.float64)[start:start + m]).to(dtype)
    want = x.clone().mul_(0.99).add_(o, alpha=-0.01)
    T.apply_signs(x, torch.from_numpy(bits), start, -0.01,
                  nonzero=None if nz is None else torch.from_numpy(nz), decay=0.99)
    assert _same(x, _np(want))


# ---------------------------------------------------------------------------------------
# planted bugs: the comparisons above must see them


def _planted(bug, monkeypatch) -> bool:
    """True when the buggy result still compares equal (the test wants False)."""
    gen = np.random.default_rng(5)
    d = 1000
    if bug == "sr_v_over_r":  # p = 0.5 + v / R: passing R / 2 to the right formula
        v = _floats(gen, d, torch.float32, specials=False, scale_exp=(-1, 0))
        got, _, _ = T.stochastic_sign_pack(v, [0.5], None, SR_KEY)
        want, _ = ops.stochastic_sign_pack(v.numpy(), 1.0, SR_KEY)
        return _same(got, want)
    if bug == "sr_offset_off_by_one":
        v = _floats(gen, d, torch.float32, specials=False, scale_exp=(-1, 0))
        got, _, _ = T.stochastic_sign_pack(v, [1.0], None, SR_KEY, 14)
        want, _ = ops.stochastic_sign_pack(v.numpy(), 1.0, SR_KEY, offset=13)
        return _same(got, want)
    if bug == "tie_coin_per_position":
        monkeypatch.setattr(T, "_tie_coins_contiguous", lambda key, d, offset, device:
                            T.coin_bits(key, T._positions(d, offset, device)))
        g = _gathered(gen, 4, d)
        got = T.majority_vote(torch.from_numpy(g), d, 0, KEY, 13)
        return _vote_same(got, ops.majority_vote(g, d, tie="coin", key=KEY, offset=13))
    if bug == "s1_wrong_bits":  # S_1 from the low 32 bits instead of the top 32
        monkeypatch.setattr(T, "_srl", lambda z, k: z & 0xFFFFFFFF if k == 32 else
                            (z >> k) & ((1 << (64 - k)) - 1))
        g = _gathered(gen, 5, d)
        got = T.majority_vote(torch.from_numpy(g), d, 2, KEY, 0)
        return _vote_same(got, ops.majority_vote(g, d, variant="v2", key=KEY))
    if bug == "sign_zero_without_coin":
        x = _floats(gen, d, torch.float32, specials=False)
        got, _ = T.sign_pack(x, None, 0)
        return _same(got, ops.pack_signs(x.numpy(), zero_key=KEY))
    if bug == "unfused_lerp":  # v + w (g - v), two roundings
        if not _fused_lerp_ok():
            pytest.skip("torch's CPU lerp is not fused here")
        v, g = _momentum_data(d, 1)
        out = v + 0.1 * (g - v)
        ref = np.empty(d, np.float32)
        _step.momentum_pass(v.numpy(), g.numpy(), ref, 0.1, _step.MODE_LERP)
        return _same(out, ref)
    raise AssertionError(bug)


@pytest.mark.parametrize("bug", ["sr_v_over_r", "sr_offset_off_by_one",
                                 "tie_coin_per_position", "s1_wrong_bits",
                                 "sign_zero_without_coin", "unfused_lerp"])
def test_planted_bug_is_detected(bug, monkeypatch):
    assert not _planted(bug, monkeypatch)


# ---------------------------------------------------------------------------------------
# the same parity on another device (CUDA) against the CPU kernels


def _parity_suite(device, sizes):
    """A compact run of the checks above with torch inputs on ``device``."""
    gen = np.random.default_rng(99)
    for d in sizes:
        for dtype in FLOATS:
            x = _floats(gen, d, dtype)
            xn = _np(x)
            packed, nbad = T.sign_pack(x.to(device), KEY, 13)
            assert packed.device.type == torch.device(device).type
            assert _same(packed, ops.pack_signs(xn, zero_key=KEY, offset=13,
                                                check_finite=False))
            assert nbad == _cpu_sign_nbad(xn, KEY, 13)
            sizes, r = _segments(gen, d, 3)
            packed, nbad, clamped = T.stochastic_sign_pack(
                x.to(device), torch.from_numpy(r).to(device), sizes, SR_KEY, 100)
            want, want_clamped = ops.stochastic_sign_pack(
                xn, r, SR_KEY, seg_sizes=sizes, offset=100, check_finite=False)
            assert _same(packed, want) and clamped == want_clamped
        for n in (1, 4, 5):
            g = _gathered(gen, n, d)
            gd = torch.from_numpy(g).to(device)
            assert _same(T.counts(gd, d), ops.vote_counts(g, d))
            for mode, (variant, tie) in MODES.items():
                assert _vote_same(T.majority_vote(gd, d, mode, KEY, 100), ops.majority_vote(
                    g, d, variant=variant, tie=tie, key=KEY, offset=100))
            for b in (1, 3, 63):
                w = T.pack_count_fields(gd[0], d, b)
                assert _same(w, ops.pack_count_fields(g[0], d, b))
                assert _same(T.unpack_count_fields(w, d, b),
                             ops.unpack_count_fields(_np(w), d, b))
        v, g = _momentum_data(d, d)
        for mode in (T.MODE_LERP, T.MODE_COPY, T.MODE_SCALE):
            if mode == T.MODE_LERP and not _fused_lerp_ok():
                continue
            out = torch.empty(d, device=device)
            got = T.momentum_pass(v.to(device), g.to(device), out, 0.1, mode)
            ref = np.empty(d, np.float32)
            want = _step.momentum_pass(v.numpy(), g.numpy(), ref, 0.1, mode)
            assert _same(out, ref) and got == (int(want[0]), int(want[1]))
        bits = gen.integers(0, 256, B.packed_nbytes(d + 13), dtype=np.uint8)
        nz = gen.integers(0, 256, B.packed_nbytes(d + 13), dtype=np.uint8)
        want = v.numpy().copy()
        _step.apply_signs(want, bits, 13, np.float32(-0.01), nonzero=nz, decay=0.999)
        xd = v.clone().to(device)
        T.apply_signs(xd, torch.from_numpy(bits).to(device), 13, -0.01,
                      nonzero=torch.from_numpy(nz).to(device), decay=0.999)
        assert _same(xd, want)


def test_parity_suite_cpu():
    _parity_suite("cpu", (0, 65, 1000))


@pytest.mark.gpu
def test_parity_suite_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch (torch.cuda.is_available() is False)")
    _parity_suite("cuda", (0, 65, 70_001, BIG))
