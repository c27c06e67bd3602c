"""Issue 14: the sr / s1 compressors' common R, the radix wires and the exponent header.

- in-process: n ranks simulated by compressors with ``size=``/``rank=`` and the NumPy
  allreduce of tests/test_compressors.py (Sum, Average, predivide, random summation
  orders), checked against that file's oracle with the documented common R
  (``common_R``): the first step, a tensor that appears later, an all-zero step, a 100x
  jump in scale (clamped, counted, identical on every rank), disagreeing R options
  (raise) and a disagreeing R from a tensor identified differently (counted, warned),
  the exponent header under every scaling, the radix codec against its reference;
- real Horovod: ``horovodrun -np 4`` of tests/workers/hvd_common_r.py, four ranks whose
  gradients differ in scale: the mean output over many steps against mean g / R_common
  (s1) and the exact law of the vote (sr), R="local" against its documented bias, the
  rules of the first step, a late tensor and a jump through a DistributedOptimizer and
  through ``hvd.grouped_allreduce``.
"""
import math
import re
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import compressors as C
from compressors import wire as W
from conftest import requires_horovod
from harness import launch
from signcomm import kernels as K
from signcomm.kernels import _fields, fields as F
from test_compressors import KINDS, SCALINGS, allreduce, common_R, oracle_bits, oracle_vote

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# Exact expectations of one coordinate's output (n ranks, gradients g_j, bounds R_j)
# --------------------------------------------------------------------------------------


def _p_plus(g, R):
    """P(S_R(g) = +1) per rank: (1 + g/R) / 2, clamped to [0, 1] (eq. 8)."""
    return np.clip((1.0 + np.asarray(g, float) / np.asarray(R, float)) / 2.0, 0.0, 1.0)


def expected_output(kind, g, R):
    """E[o] of one coordinate: s1 is unbiased, E = mean of E[S_R(g_j)] = mean clip(g_j/R_j);
    sr votes the sign of the count c (a Poisson-binomial): P(2c > n) - P(2c < n), a tie
    being a fair coin."""
    p = _p_plus(g, R)
    if kind == "s1":
        return float(np.mean(2 * p - 1))
    dist = np.array([1.0])
    for pj in p:
        dist = np.convolve(dist, [1 - pj, pj])
    n = len(p)
    c = np.arange(n + 1)
    return float(dist[2 * c > n].sum() - dist[2 * c < n].sum())


def test_expected_output_matches_the_issue():
    """The issue's numbers: local R gives s1 E[o] = [0.35, 1, 0.24] (coordinate 0 uphill);
    one common R (10) gives mean g / 10 = [-0.1, 0.55, 0.015]."""
    g = np.array([[1, 1, 0.5]] * 2 + [[-3, 10, -0.2]] * 2)
    local = [expected_output("s1", g[:, i], [1, 1, 10, 10]) for i in range(3)]
    np.testing.assert_allclose(local, [0.35, 1.0, 0.24])
    common = [expected_output("s1", g[:, i], [10] * 4) for i in range(3)]
    np.testing.assert_allclose(common, [-0.1, 0.55, 0.015])
    sr_local = expected_output("sr", g[:, 0], [1, 1, 10, 10])
    sr_common = expected_output("sr", g[:, 0], [10] * 4)
    assert sr_local > 0 > sr_common          # local R moves coordinate 0 uphill on average


# --------------------------------------------------------------------------------------
# In-process: the rules of the common R
# --------------------------------------------------------------------------------------

SCALES = [1.0, 2.0, 5.0, 0.1]          # rank j's gradients are scaled by SCALES[j]


def _step_grads(n, shapes, seed, scales=SCALES):
    out = []
    for j in range(n):
        rng = np.random.default_rng([seed, j])
        out.append({f"t{i}": torch.tensor(rng.standard_normal(s) * scales[j % len(scales)],
                                          dtype=torch.float32)
                    for i, s in enumerate(shapes)})
    return out


def run_steps(comps, steps, **ar):
    """steps[t][j][name]: rank j's tensors at step t, compressed in dict order.  Returns
    per step {name: (outputs per rank, R per rank, ctx per rank)}."""
    res = []
    for grads in steps:
        sent = [{nm: comp.compress(t) for nm, t in g.items()} for comp, g in zip(comps, grads)]
        step = {}
        for nm in grads[0]:
            total = allreduce([s[nm][0] for s in sent], **ar)
            outs = [comp.decompress(total.clone(), sent[j][nm][1])
                    for j, comp in enumerate(comps)]
            step[nm] = (outs, [s[nm][1].r for s in sent], [s[nm][1] for s in sent])
        res.append(step)
    return res


def check_against_oracle(kind, steps, res, seed, k_of):
    """Every step's output equals the oracle's with the documented R (local at a
    tensor's first step, common_R after), and every rank used the same R from step 1."""
    contribute, vote = KINDS[kind]
    n = len(steps[0])
    prev = {}
    for t, (grads, step) in enumerate(zip(steps, res)):
        for nm, (outs, rs, _) in step.items():
            R = common_R(prev.get(nm))
            if R == "local":
                want_r = [max(float(grads[j][nm].abs().max()), 0.0) or 1.0 for j in range(n)]
            else:
                want_r = [R] * n
            assert rs == pytest.approx(want_r, rel=0, abs=0), (t, nm, rs, want_r)
            bits = [oracle_bits(grads[j][nm].numpy(), contribute, seed=seed, rank=j, step=t,
                                k=k_of(nm), R=R if R != "local" else "local")
                    for j in range(n)]
            want = oracle_vote(bits, vote, seed=seed, step=t)
            for j in range(n):
                np.testing.assert_array_equal(outs[j].numpy().ravel(), want,
                                              err_msg=f"{kind} step {t} {nm} rank {j}")
            prev[nm] = [grads[j][nm].numpy() for j in range(n)]


@pytest.mark.parametrize("kind", ["sr", "s1"])
@pytest.mark.parametrize("wire,scaling", [
    ("auto", dict(op="average")), ("auto", dict(op="sum", pre=1 / 7, post=7.0)),
    ("float64", dict(op="average", pre=1 / 3, post=3.0)), ("int64-radix", dict(op="sum")),
    ("int64", dict(op="sum")), ("float64-radix", dict(op="sum"))])
def test_default_R_first_step_local_then_common(kind, wire, scaling):
    n, seed = 4, 5
    shapes = [(100,), (100,), (37,), (3, 5)]
    contribute, vote = KINDS[kind]
    comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, size=n, rank=j,
                                      seed=seed, wire=wire) for j in range(n)]
    steps = [_step_grads(n, shapes, 100 + t) for t in range(4)]
    order = list(np.random.default_rng(seed).permutation(n))
    res = run_steps(comps, steps, order=order, **scaling)
    names = list(steps[0][0])
    check_against_oracle(kind, steps, res, seed,
                         lambda nm: sum(steps[0][0][m].numel() == steps[0][0][nm].numel()
                                        for m in names[:names.index(nm)]))
    for c in comps:
        assert c.stats["r_first"] == len(shapes)       # one first step per tensor
        assert c.stats["r_mismatch"] == 0
        assert c.wire_used == ("float64-radix" if wire == "auto" else wire)


@pytest.mark.parametrize("kind", ["sr", "s1"])
def test_scale_jump_is_clamped_counted_and_identical_on_every_rank(kind):
    n, seed, d = 4, 9, 5000
    contribute, vote = KINDS[kind]
    comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, size=n, rank=j,
                                      seed=seed) for j in range(n)]
    steps = [_step_grads(n, [(d,)], 200 + t, [1.0] * n) for t in range(4)]
    for j in range(n):                              # step 2: every gradient x100
        steps[2][j]["t0"] = steps[2][j]["t0"] * 100
    before = [0] * n
    res = []
    for t, grads in enumerate(steps):
        res += run_steps(comps, [grads])
        if t == 2:
            R = res[2]["t0"][1][0]
            assert R == common_R([steps[1][j]["t0"].numpy() for j in range(n)])
            for j, c in enumerate(comps):
                over = int((steps[2][j]["t0"].abs() > R).sum())
                assert over > d // 2                # most coordinates are above the old bound
                assert c.stats["clamped_common"] - before[j] == over
        before = [c.stats["clamped_common"] for c in comps]
    check_against_oracle(kind, steps, res, seed, lambda nm: 0)
    assert res[3]["t0"][1][0] > 50 * res[2]["t0"][1][0]  # the next step follows the jump
    for step in res:
        for outs, rs, _ in step.values():
            assert all(torch.equal(outs[0], o) for o in outs)


def test_tensor_appearing_later_and_all_zero_steps_use_the_first_step_rule():
    n, seed = 3, 4
    comps = [C.S1Compressor(size=n, rank=j, seed=seed) for j in range(n)]
    steps = []
    for t in range(5):
        g = _step_grads(n, [(50,), (60,)], 300 + t)
        for j in range(n):
            if t < 2:
                del g[j]["t1"]                       # t1 appears at step 2
            if t == 3:
                g[j]["t0"] = torch.zeros(50)          # an all-zero step: no bound after it
        steps.append(g)
    res = []
    for grads in steps:
        res += run_steps(comps, [grads])
    local = lambda t, nm: [float(steps[t][j][nm].abs().max()) or 1.0 for j in range(n)]  # noqa
    assert res[2]["t1"][1] == local(2, "t1")         # t1's first step
    assert len(set(res[3]["t1"][1])) == 1            # then common
    assert res[3]["t0"][1] == [common_R([steps[2][j]["t0"].numpy() for j in range(n)])] * n
    assert res[4]["t0"][1] == local(4, "t0")         # after the all-zero step
    assert all(c.stats["r_first"] == 1 + 1 + 1 for c in comps)   # t0 at 0, t1 at 2, t0 at 4
    prev = {}
    for t, step in enumerate(res):                    # and the bits are the oracle's
        for nm, (outs, rs, _) in step.items():
            bits = [oracle_bits(steps[t][j][nm].numpy(), "sr", seed=seed, rank=j, step=t,
                                R=rs[j]) for j in range(n)]
            np.testing.assert_array_equal(outs[0].numpy(), oracle_vote(bits, "s1", seed=seed,
                                                                       step=t))


@pytest.mark.parametrize("other", [0.5, "local"])
def test_disagreeing_R_options_raise_on_every_rank(other):
    """Issue 18: R options that differ across ranks are in the settings every header
    carries (tests/test_compressors_agreement.py has the other settings)."""
    n = 3
    comps = [C.SRCompressor(size=n, rank=j, R=other if j == 1 else "common") for j in range(n)]
    sent = [c.compress(g["t0"]) for c, g in zip(comps, _step_grads(n, [(40,)], 1))]
    total = allreduce([w for w, _ in sent])
    policy = "fixed" if other == 0.5 else other
    for j, (c, (_, ctx)) in enumerate(zip(comps, sent)):
        with pytest.raises(C.RankMismatchError,
                           match=rf"R differs across ranks \('common' on 2, '{policy}' on 1 "
                                 rf"of 3 ranks\)\. This rank \({j}\) has R="):
            c.decompress(total.clone(), ctx)


def test_R_used_that_differs_is_counted_and_warned_on_every_rank():
    """Same options, but a tensor identified differently on one rank (same-sized
    tensors by index, compressed in another order there): the R codes disagree."""
    n = 3
    comps = [C.SRCompressor(size=n, rank=j) for j in range(n)]
    steps = [_step_grads(n, [(40,), (40,)], t, [1.0, 1.0, 1.0]) for t in range(2)]
    for g in steps:
        for j in range(n):
            g[j]["t1"] = g[j]["t1"] * 100       # t1's bound is 100x t0's
    run_steps(comps, steps[:1])                 # first step: everyone "no bound" ...
    assert all(c.stats["r_mismatch"] == 0 for c in comps)
    steps[1][1] = {"t1": steps[1][1]["t1"], "t0": steps[1][1]["t0"]}
    with pytest.warns(RuntimeWarning, match="did not all use the same R"):
        run_steps(comps, steps[1:])             # ... then rank 1 swaps the two bounds
    assert all(c.stats["r_mismatch"] == 2 for c in comps)


def test_sign_and_fixed_R_need_no_bound():
    n = 2
    for comps in ([C.SignCompressor(size=n, rank=j) for j in range(n)],
                  [C.SRCompressor(size=n, rank=j, R=2.0) for j in range(n)],
                  [C.SRCompressor(size=n, rank=j, R="local") for j in range(n)]):
        run_steps(comps, [_step_grads(n, [(30,)], t) for t in range(3)])
        assert all(c.bounds() == {} and c.stats["r_first"] == 0 for c in comps)


def test_the_common_R_is_within_a_quarter_octave_of_the_max():
    for n, q in ((2, 8), (4, 8), (7, 8), (8, 4), (15, 4), (16, 2), (255, 2), (256, 1)):
        assert W.exponent_unit(n) == q
        for m in (1e-12, 3e-7, 0.1, 1.0, 1.5, 10.0, 2.0 ** 30, 3e9):
            e = W.max_exponent(m, n)
            assert m <= W.bound(e, n) < m * 2 ** (1 / q) * (1 + 1e-15)


# --------------------------------------------------------------------------------------
# In-process statistics: E[o] with the issue's example (fast; Horovod below)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sr", "s1"])
def test_mean_output_common_vs_local_in_process(kind):
    n, M, steps = 4, 3000, 8
    pattern = np.array([[1, 1, 0.5]] * 2 + [[-3, 10, -0.2]] * 2)
    contribute, vote = KINDS[kind]
    for R in ("common", "local"):
        comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, size=n, rank=j,
                                          seed=3, R=R) for j in range(n)]
        g = [{"w": torch.tensor(np.tile(pattern[j], M), dtype=torch.float32)}
             for j in range(n)]
        res = run_steps(comps, [g] * steps, op="average")
        first = 1 if R == "common" else 0          # the common R starts at step 1
        o = np.stack([r["w"][0][0].numpy().reshape(M, 3) for r in res[first:]])
        mean = o.reshape(-1, 3).mean(axis=0)
        Rs = [W.bound(W.max_exponent(10.0, n), n)] * n if R == "common" else [1, 1, 10, 10]
        want = np.array([expected_output(kind, pattern[:, i], Rs) for i in range(3)])
        sd = np.sqrt((1 - want ** 2) / (o.shape[0] * M))
        assert np.all(np.abs(mean - want) < 5 * sd + 1e-12), (kind, R, mean, want, sd)
        if R == "local":
            assert mean[0] > 0.1                     # uphill: the documented bias
        else:
            assert mean[0] < -0.01                   # the sign of the mean gradient


# --------------------------------------------------------------------------------------
# The exponent header and the radix wires
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 15, 16, 100, 255, 256, 1000])
def test_exponent_header_gives_the_max_under_every_scaling(n):
    rng = np.random.default_rng(n)
    for wire in W.WIRES:
        try:
            lo, hi = W.exponent_range(n, wire)
            W.layout(n, wire)
        except ValueError:
            continue
        scalings = SCALINGS if W.is_float(wire) else [dict(op="sum")]
        for trial in range(4):
            e = [None if rng.random() < 0.2 else int(rng.integers(lo - 5, hi + 5))
                 for _ in range(n)]
            d = 17
            msgs = [torch.from_numpy(W.encode(K.pack_bits(rng.random(d) < 0.5), 0, d, n, j,
                                              step=1, nonfinite=0, nonce=3, wire=wire,
                                              exponent=e[j])[0]) for j in range(n)]
            want = max((min(hi, max(lo, x)) for x in e if x is not None), default=None)
            for sc in scalings:
                total = allreduce(msgs, order=list(rng.permutation(n)), **sc).numpy()
                dec = W.decode(total, d, n, 0, np.empty(d, W.count_dtype(n)), wire=wire)
                assert dec.exponent == want, (wire, sc, e)
                assert dec.r_agree


@settings(max_examples=40, deadline=None)
@given(d=st.integers(0, 700), n=st.integers(1, 300), seed=st.integers(0, 2 ** 32 - 1),
       word=st.sampled_from(["int64", "float64"]), radix=st.booleans())
def test_layout_codec_matches_reference_and_sums_exactly(d, n, seed, word, radix):
    try:
        lay = F.layout(n, word, radix)
    except ValueError:
        return
    rng = np.random.default_rng(seed)
    rows = rng.random((min(n, 5), d)) < rng.random()
    total = [0] * lay.data_words(d)
    for r in rows:
        packed = K.pack_bits(r)
        words, pop = F.encode_layout(packed, d, lay, header=2)
        ref, ref_pop = _fields.encode_words_reference(packed, d, lay.base, lay.f)
        assert [int(x) for x in words[2:]] == ref and pop == ref_pop == r.sum()
        total = [a + b for a, b in zip(total, ref)]
    extra = n - len(rows)                           # the other ranks: all ones
    ones, _ = _fields.encode_words_reference(K.pack_bits(np.ones(d, bool)), d, lay.base, lay.f)
    total = [a + extra * b for a, b in zip(total, ones)]
    want = rows.sum(axis=0) + extra
    summed = np.array(total, np.int64 if word == "int64" else np.float64)
    counts = np.empty(d, W.count_dtype(n))
    dev, tot, bad, _ = F.decode_layout(summed, d, lay, n, counts)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(_fields.decode_words_reference(total, d, lay.base, lay.f),
                                  want)
    assert dev == 0 and tot == want.sum() and bad == 0
    if word == "float64" and d:
        dev, tot, bad, _ = F.decode_layout(summed * 0.37, d, lay, n, counts, inv_scale=1 / 0.37)
        np.testing.assert_array_equal(counts, want)
        assert dev < W.MAX_DEV and bad == 0
    if d:
        broken = summed.copy()
        broken[-1] = lay.limit if word == "float64" else -1
        assert F.decode_layout(broken, d, lay, n, counts).bad > 0


def test_radix_layouts_are_the_fewest_bits():
    """Radix n + 1 holds F digits with (n + 1)**F within the word's exact range, F the
    largest such; binary layouts are the radix-2**b ones with the same rule."""
    for n in range(1, 300):
        b = W.field_bits(n)
        for word, cap in (("int64", 2 ** 63), ("float64", 2 ** (W.SAFE_BITS - b))):
            try:
                lay = F.layout(n, word, True)
            except ValueError:
                continue
            base = n + 1 if n <= F.RADIX_MAX_N else 2 ** b
            assert lay.base ** lay.f <= cap < lay.base ** (lay.f + 1), (n, word)
            assert lay.f >= F.layout(n, word, False).f


def test_radix_table_in_the_docs():
    text = (ROOT / "docs" / "compressors.md").read_text()
    rows = re.findall(r"^\|\s*n = (\d+)\s*\|([^\n]*)$", text, re.M)
    assert len(rows) >= 6, "docs/compressors.md lost its radix wire table"
    for n, rest in rows:
        n = int(n)
        cells = [c.strip() for c in rest.split("|")]
        f64, f64r, i64, i64r = (float(c) for c in cells[:4])
        assert f64 == round(W.bits_per_coordinate(n, "float64"), 2), n
        assert f64r == round(W.bits_per_coordinate(n, "float64-radix"), 2), n
        assert i64 == round(W.bits_per_coordinate(n, "int64"), 2), n
        assert i64r == round(W.bits_per_coordinate(n, "int64-radix"), 2), n


def test_wires_and_options():
    assert C.SRCompressor().R == "common" and C.S1Compressor().R == "common"
    assert C.Compression.sr.R == "common" and C.Compression.s1.wire == "auto"
    for bad in ("int32", "fp16", "float32"):
        with pytest.raises(ValueError, match="wire must be one of"):
            C.SignCompressor(wire=bad)
    c = C.SignCompressor(size=2, rank=0, wire="int64", max_message_words=W.H + 1)
    with pytest.raises(ValueError, match="header"):
        c.compress(torch.randn(10))                  # the int64 header needs more words


# --------------------------------------------------------------------------------------
# Real Horovod: 4 ranks of different scales
# --------------------------------------------------------------------------------------

STEPS, M = 30, 4000
PATTERN = np.array([[1, 1, 0.5]] * 2 + [[-3, 10, -0.2]] * 2)


@pytest.fixture(scope="module")
def job():
    return launch("hvd_common_r.py", 4, launcher="horovodrun", args=[STEPS, M], timeout=280)


def hvd_test(fn):
    return pytest.mark.horovod(pytest.mark.multirank(requires_horovod(fn)))


def _check_mean(job, name, kind, Rs, first):
    for r in range(4):   # every rank received the same outputs
        np.testing.assert_array_equal(job[r][f"{name}|mean"], job[0][f"{name}|mean"])
    mean = job[0][f"{name}|mean"][first:].mean(axis=0)
    want = np.array([expected_output(kind, PATTERN[:, i], Rs) for i in range(3)])
    sd = np.sqrt((1 - want ** 2) / ((STEPS - first) * M))
    assert np.all(np.abs(mean - want) < 5 * sd + 1e-12), (name, mean, want, sd)
    return mean


@hvd_test
@pytest.mark.parametrize("kind", ["sr", "s1"])
@pytest.mark.parametrize("which", ["common", "default"])
def test_hvd_mean_output_is_that_of_the_common_R(job, kind, which):
    """Fails on the old default (R="local"): coordinate 0 would move uphill."""
    R = W.bound(W.max_exponent(10.0, 4), 4)           # 2**(27/8) = 10.4 >= max |g| = 10
    mean = _check_mean(job, f"{kind}_{which}", kind, [R] * 4, first=1)
    assert mean[0] < 0                                # the sign of the mean gradient
    if kind == "s1":                                  # unbiased: mean g / R
        np.testing.assert_allclose(mean, PATTERN.mean(axis=0) / R, atol=0.02)
    bounds = job[0][f"{kind}_{which}|bound"]
    assert list(bounds) == [R]
    r_first, clamped, mismatch = job[0][f"{kind}_{which}|stats"]
    assert (r_first, clamped, mismatch) == (1, 0, 0)


@hvd_test
@pytest.mark.parametrize("kind", ["sr", "s1"])
def test_hvd_local_R_reproduces_the_documented_bias(job, kind):
    mean = _check_mean(job, f"{kind}_local", kind, [1, 1, 10, 10], first=0)
    assert mean[0] > 0.1                              # uphill on coordinate 0
    if kind == "s1":
        np.testing.assert_allclose(mean, [0.35, 1.0, 0.24], atol=0.02)


@hvd_test
@pytest.mark.parametrize("kind", ["sr", "s1"])
def test_hvd_first_step_late_tensor_and_jump(job, kind):
    contribute, vote = KINDS[kind]
    seed = 21 if kind == "sr" else 22
    T = STEPS // 3
    names = ("steady", "late", "jump")
    for nm in names:
        g = [job[r][f"opt|{kind}|{nm}|g"] for r in range(4)]
        o = [job[r][f"opt|{kind}|{nm}|o"] for r in range(4)]
        rs = [job[r][f"opt|{kind}|{nm}|r"] for r in range(4)]
        clamped = [job[r][f"opt|{kind}|{nm}|clamped"] for r in range(4)]
        assert len(g[0]) == T
        prev = None
        for t in range(T):
            R = common_R(prev)
            if R == "local":   # first step, or after the late tensor's all-zero steps
                want_r = [float(np.abs(g[r][t]).max()) or 1.0 for r in range(4)]
            else:
                want_r = [R] * 4
            assert [rs[r][t] for r in range(4)] == want_r, (nm, t)
            bits = [oracle_bits(g[r][t], contribute, seed=seed, rank=r, step=t, R=want_r[r])
                    for r in range(4)]
            want = oracle_vote(bits, vote, seed=seed, step=t)
            for r in range(4):
                np.testing.assert_array_equal(o[r][t], want, err_msg=f"{kind} {nm} {t} {r}")
                over = int((np.abs(g[r][t]) > want_r[r]).sum()) if R != "local" else 0
                assert clamped[r][t] == over
            prev = None if not np.any([np.abs(g[r][t]).max() for r in range(4)]) else \
                [g[r][t] for r in range(4)]
        if nm == "late":      # zeros at steps 0-2 (Horovod fills them in), then its own
            assert all(np.all(g[r][t] == 0) for r in range(4) for t in range(3))
            assert rs[0][3] != rs[3][3] and rs[0][4] == rs[3][4]
        if nm == "jump":      # step 5: gradients x100 against the bound of step 4
            assert all(clamped[r][5] > 250 for r in range(4))
            assert all(clamped[r][6] < 10 for r in range(4))    # the bound caught up
    r_first = job[0][f"opt|{kind}|stats"][0]
    assert r_first == 1 + 4 + 1      # steady, late (steps 0-3), jump at step 0


@hvd_test
def test_hvd_grouped_allreduce_identity_by_size_and_index(job):
    assert job[0]["grp|stats"][0] == 2 + 1       # the two 300s at step 0, the 333 at step 3
    for tag, first in (("grp|300.0", 0), ("grp|300.1", 0), ("grp|333.0", 3)):
        rs = [job[r][f"{tag}|r"] for r in range(4)]
        g = [job[r][f"{tag}|g"] for r in range(4)]
        assert len(set(r[0] for r in rs)) > 1   # first step: each rank its own max
        for t in range(1, len(rs[0])):
            want = common_R([g[r][t - 1] for r in range(4)])
            assert [r[t] for r in rs] == [want] * 4, (tag, t)
        for r in range(4):
            np.testing.assert_array_equal(job[r][f"{tag}|o"], job[0][f"{tag}|o"])
    assert job[0]["grp|stats"][2] == 0



@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 63, 126, 127, 128, 255])
def test_v1_vote_of_uint8_counts_equals_the_reference(n):
    """The compressors decode counts as uint8; vote_from_counts then takes eight at a time
    (n < 128). Same bits and tie mask as int64 counts and the reference, at every offset."""
    from signcomm.kernels import reference
    rng = np.random.default_rng(n)
    for d in (0, 1, 7, 9, 64, 65, 1000, 16385, 40001):
        c = rng.integers(0, n + 1, d).astype(np.uint8)
        c[rng.random(d) < 0.3] = n // 2                    # many ties for even n
        for mode, tie in ((0, "coin"), (1, "zero")):
            for off in (0, 5, 64, 1000):
                a = K.vote_from_counts(c, n, tie=tie, key=77, offset=off)
                b = K.vote_from_counts(c.astype(np.int64), n, tie=tie, key=77, offset=off)
                want, _ = reference.decide_from_counts(c.astype(np.int64), n, mode, 77, off)
                np.testing.assert_array_equal(a.bits, want)
                np.testing.assert_array_equal(a.bits, b.bits)
                assert (a.nonzero is None) == (b.nonzero is None)
                if a.nonzero is not None:
                    np.testing.assert_array_equal(a.nonzero, b.nonzero)
