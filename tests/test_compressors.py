"""compressors/: Horovod compressors that allreduce sign / S_R bits as count fields.

Two halves:

- in-process: n ranks simulated by n compressors with explicit ``size``/``rank`` and an
  allreduce written out in NumPy the way Horovod's MPI path does it (prescale each rank's
  float64 buffer, sum in some order, postscale; Average divides the postscale by n),
  checked against a single-process oracle of the vote written here from docs/algorithms.md;
- real Horovod: one ``horovodrun -np 4`` and one ``mpirun -np 3`` job of an ordinary
  training script (tests/workers/hvd_compressors.py) with every op/option, whose every
  step's decompressed result is compared with the same oracle.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import compressors as C
from compressors import wire as W
from signcomm.kernels import _fields
from signcomm.kernels import fields as codec
from conftest import requires_horovod
from harness import launch
from signcomm import kernels as K
from signcomm.kernels.rng import splitmix64

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# The oracle: plain NumPy from docs/algorithms.md and the key derivation in docs/compressors.md
# --------------------------------------------------------------------------------------


def _rank_key(seed, purpose, rank, step, d, k):
    return K.key64(K.key64(seed, K.stream_id(purpose, rank), step), d, k)


def _counts_hash(c, n):
    """The counts hash of docs/compressors.md, in NumPy (uint64 arithmetic wraps)."""
    raw = np.asarray(c, "<u1" if n < 256 else "<u2").tobytes()
    u = np.frombuffer(raw + bytes(-len(raw) % 8), "<u8")
    z = u + np.arange(1, u.size + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = int((z ^ (z >> np.uint64(31))).sum(dtype=np.uint64))
    return splitmix64(h ^ len(raw))


def _shared_key(seed, purpose, step_sum, d, c, n):
    return K.key64(K.key64(seed, K.stream_id(purpose), step_sum), d, _counts_hash(c, n))


def oracle_bits(g, contribute, *, seed, rank, step, k=0, R="local"):
    """Rank ``rank``'s bit per coordinate (True = +1)."""
    g = np.asarray(g, np.float64).ravel()
    d = g.size
    pos = np.arange(d, dtype=np.uint64)
    if contribute == "sign":   # sign(g); an exact 0 is a fair coin of the rank's stream
        coin = K.coin_bits(_rank_key(seed, K.Purpose.ZERO_COIN, rank, step, d, k), pos)
        return np.where(g == 0, coin, g > 0)
    r = (float(np.abs(g).max()) if d else 0.0) if R == "local" else float(R)
    r = r if r > 0 else 1.0
    u = K.uniform(_rank_key(seed, K.Purpose.STOCHASTIC_SIGN, rank, step, d, k), pos)
    return u < 0.5 + g * (0.5 / r)          # P(+1) = (R + g) / (2R), eq. 8


def common_R(prev):
    """The default R of sr/s1 (docs/compressors.md, "R for S_R"): the least 2**(e/q)
    (integer e; q = 8 for n <= 7 ranks, 4 for n <= 15, 2 for n <= 255, else 1) at or above
    the max over ranks of max |g| of the tensor at the previous step; "local" at its first
    step (``prev`` None) or after a step where it was all zeros."""
    if prev is None:
        return "local"
    m = max((float(np.abs(np.asarray(g, np.float64)).max()) if np.size(g) else 0.0)
            for g in prev)
    if m == 0:
        return "local"
    n = len(prev)
    q = 8 if n <= 7 else 4 if n <= 15 else 2 if n <= 255 else 1
    e = int(np.ceil(q * np.log2(m))) + 1
    while np.ldexp(2.0 ** ((e - 1) % q / q), (e - 1) // q) >= m:
        e -= 1
    return float(np.ldexp(2.0 ** (e % q / q), e // q))


def oracle_vote(bits, vote="sign", tie="coin", *, seed, step):
    """The vote of n ranks' bits (all at the same step): +1/-1, 0 for a "zero" tie."""
    n = len(bits)
    c = np.sum(np.asarray(bits, np.int64), axis=0)
    d = c.size
    pos = np.arange(d, dtype=np.uint64)
    if vote == "s1":                       # eq. 11: +1 with probability c / n
        key = _shared_key(seed, K.Purpose.S1, n * step, d, c, n)
        u32 = (K.random_words(key, pos) >> np.uint64(32)).astype(np.int64)
        return np.where(u32 * n < (c << 32), 1, -1)
    o = np.sign(2 * c - n)                 # eq. 10
    if tie == "coin" and n % 2 == 0:
        coin = K.tie_coin_bits(_shared_key(seed, K.Purpose.TIE_COIN, n * step, d, c, n), pos)
        o = np.where(o == 0, np.where(coin, 1, -1), o)
    return o


# --------------------------------------------------------------------------------------
# A simulated allreduce: what Horovod's MPI path does to the wire tensors
# --------------------------------------------------------------------------------------


def allreduce(wires, op="sum", pre=1.0, post=1.0, order=None):
    arrs = [w.numpy() for w in wires]
    n = len(arrs)
    order = list(range(n)) if order is None else order
    if arrs[0].dtype == np.int64:
        tot = sum(arrs[j] for j in order)
        return torch.from_numpy(tot // n if op == "average" else tot)
    y = [a * pre if pre != 1.0 else a for a in arrs]
    tot = y[order[0]].copy()
    for j in order[1:]:
        tot = tot + y[j]
    q = post / n if op == "average" else post
    return torch.from_numpy(tot * q if q != 1.0 else tot)


def same_size_index(grads, name):
    """k of tensor ``name``: how many tensors of its size the rank compressed before it."""
    names = list(grads)
    d = grads[name].numel()
    return sum(grads[m].numel() == d for m in names[:names.index(name)])


def simulate(comps, grads, **ar):
    """grads[j][name]: rank j's tensors, compressed in rank j's dict order; returns
    outs[j][name]."""
    sent = [{nm: comp.compress(t) for nm, t in g.items()} for comp, g in zip(comps, grads)]
    outs = [{} for _ in comps]
    for nm in grads[0]:
        total = allreduce([s[nm][0] for s in sent], **ar)
        for j, comp in enumerate(comps):
            outs[j][nm] = comp.decompress(total.clone(), sent[j][nm][1])
    return outs


KINDS = {"sign": ("sign", "sign"), "sr": ("sr", "sign"), "s1": ("sr", "s1")}
SCALINGS = [dict(op="sum"), dict(op="average"), dict(op="average", pre=1 / 3, post=3.0),
            dict(op="sum", pre=1 / 7, post=7.0)]
SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (1000,)]


def _grads(n, shapes, seed, zeros=0.1, dtype=torch.float32):
    out = []
    for j in range(n):
        rng = np.random.default_rng([seed, j])
        g = {}
        for i, s in enumerate(shapes):
            x = rng.standard_normal(s) * (rng.random(s) > zeros)
            g[f"t{i}"] = torch.tensor(x).to(dtype)
        out.append(g)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_simulated_allreduce_matches_oracle(n, kind, backend):
    """Both backends (the torch one is what CUDA tensors use) give the oracle's vote."""
    contribute, vote = KINDS[kind]
    for si, scaling in enumerate(SCALINGS):
        for wire in ("float64", "int64"):
            if wire == "int64" and scaling != dict(op="sum"):
                continue
            seed = 10 * si + n
            comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, seed=seed,
                                              size=n, rank=j, wire=wire, backend=backend)
                     for j in range(n)]
            grads = _grads(n, SHAPES, seed)
            order = list(np.random.default_rng(seed).permutation(n))
            outs = simulate(comps, grads, order=order, **scaling)
            for nm, t in grads[0].items():
                bits = [oracle_bits(grads[j][nm].numpy(), contribute, seed=seed, rank=j,
                                    step=0, k=same_size_index(grads[j], nm))
                        for j in range(n)]
                want = oracle_vote(bits, vote, seed=seed, step=0)
                for j in range(n):
                    got = outs[j][nm]
                    assert got.shape == t.shape and got.dtype == t.dtype
                    np.testing.assert_array_equal(got.numpy().ravel(), want,
                                                  err_msg=f"{kind} n={n} {scaling} {wire} {nm}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_dtypes_keep_dtype_shape_and_match_oracle(dtype, backend):
    n = 4
    comps = [C.SignCompressor(size=n, rank=j, tie="zero", backend=backend) for j in range(n)]
    grads = _grads(n, [(2, 3, 4), (17,)], 7, dtype=dtype)
    outs = simulate(comps, grads, op="average")
    for nm, t in grads[0].items():
        bits = [oracle_bits(grads[j][nm].float().numpy(), "sign", seed=0, rank=j, step=0)
                for j in range(n)]
        want = oracle_vote(bits, "sign", "zero", seed=0, step=0)
        for j in range(n):
            assert outs[j][nm].dtype == dtype and outs[j][nm].shape == t.shape
            np.testing.assert_array_equal(outs[j][nm].float().numpy().ravel(), want)


def test_ties_under_each_rule():
    """n = 2 with opposite signs: every coordinate ties; "zero" gives 0, "coin" a fair
    coin that is the same on both ranks and about half +1."""
    d = 4000
    g = torch.randn(d)
    for tie in ("zero", "coin"):
        comps = [C.SignCompressor(size=2, rank=j, tie=tie) for j in range(2)]
        outs = simulate(comps, [{"x": g}, {"x": -g}])
        assert torch.equal(outs[0]["x"], outs[1]["x"])
        if tie == "zero":
            assert (outs[0]["x"] == 0).all()
        else:
            frac = (outs[0]["x"] == 1).float().mean().item()
            assert abs(frac - 0.5) < 4 * 0.5 / d ** 0.5, frac


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 15, 16, 31, 63, 100, 255, 1000])
def test_worst_case_counts_decode_exactly_under_scaling(n):
    """Every count = n (all fields full: the largest words the float64 wire can carry)
    survives Average, predivide-style factors and any summation order; so does a random
    mix.  (Messages built by wire.encode, as compress does, to keep n = 1000 cheap.)"""
    d = 3 * W.fields_per_word(n) + 5
    rng = np.random.default_rng(n)
    for fill in ("ones", "random"):
        rows = np.ones((n, d), bool) if fill == "ones" else rng.random((n, d)) < 0.5
        msgs = [torch.from_numpy(W.encode(K.pack_bits(r), 0, d, n, j, step=3, nonfinite=0,
                                          nonce=77)[0]) for j, r in enumerate(rows)]
        for scaling in SCALINGS + [dict(op="average", pre=1 / 0.37, post=0.37),
                                   dict(op="average", pre=1 / 1000.0, post=1000.0)]:
            total = allreduce(msgs, order=list(rng.permutation(n)), **scaling).numpy()
            counts = np.empty(d, W.count_dtype(n))
            dec = W.decode(total, d, n, 0, counts)
            np.testing.assert_array_equal(counts, rows.sum(axis=0), err_msg=str(scaling))
            assert dec["step"] == 3 * n and dec["nonce"] == 77 * n


@settings(max_examples=60, deadline=None)
@given(d=st.integers(0, 400), n=st.integers(1, 70), seed=st.integers(0, 2 ** 32 - 1))
def test_field_kernels_match_reference(d, n, seed):
    """The float64 binary wire's codec (b-bit fields, ``fields.encode`` / ``decode``, as
    ``wire="float64"`` uses it) against the NumPy statement of the layout."""
    rng = np.random.default_rng(seed)
    b, f = W.field_bits(n), W.fields_per_word(n)
    assert codec.binary_layout(b, "float64").f == f
    rows = rng.random((n, d)) < rng.random()
    words = []
    for r in rows:
        packed = K.pack_bits(r)
        out, pop = codec.encode(packed, d, b, "float64")
        ref, ref_pop = _fields.encode_words_reference(packed, d, 2 ** b, f)
        np.testing.assert_array_equal(out, np.asarray(ref, np.float64))
        assert pop == ref_pop == r.sum()
        words.append(out)
    total = np.sum(words, axis=0) if d else np.zeros(0)
    counts = np.empty(d, np.int64)
    dev, tot, bad, _ = codec.decode(total, d, b, n, counts, "float64")
    want = rows.sum(axis=0)
    np.testing.assert_array_equal(counts, want)
    ints = np.rint(total).astype(np.int64)
    np.testing.assert_array_equal(_fields.decode_words_reference(ints, d, 2 ** b, f), want)
    assert dev == 0 and tot == want.sum() and bad == 0
    vals = np.empty(d, np.float32)
    vote = K.vote_from_counts(counts, n, tie="zero")
    nz = vote.nonzero if vote.nonzero is not None else np.zeros(0, np.uint8)
    K.vote_values(vote, d, out=vals)
    np.testing.assert_array_equal(vals, vote.values(d))


def test_bits_per_coordinate_formula_and_docs_table():
    for n in range(1, 2000):
        b = W.field_bits(n)
        assert b == int(np.ceil(np.log2(n + 1)))
        f = W.fields_per_word(n)
        assert f * b <= W.SAFE_BITS - b < (f + 1) * b      # float64: largest safe F
        assert W.fields_per_word(n, "int64") == 63 // b
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|",
                      (ROOT / "docs" / "compressors.md").read_text(), re.M)
    assert len(rows) >= 6, "docs/compressors.md lost its bits-per-coordinate table"
    for n, b, f64, i64 in rows:
        n = int(n)
        assert int(b) == W.field_bits(n)
        assert float(f64) == round(W.bits_per_coordinate(n), 2), n
        assert float(i64) == round(W.bits_per_coordinate(n, "int64"), 2), n


def test_int64_wire_needs_sum():
    n = 3
    for op, ok in (("sum", True), ("average", False)):
        comps = [C.SRCompressor(size=n, rank=j, wire="int64") for j in range(n)]
        grads = _grads(n, [(100,)], 3)
        if ok:
            simulate(comps, grads, op=op)
        else:
            with pytest.raises(C.WireError, match="op=hvd.Sum"):
                simulate(comps, grads, op=op)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_nonfinite_raises_on_every_rank_naming_the_tensor(bad, kind, backend):
    n = 4
    contribute, vote = KINDS[kind]
    params = [torch.nn.Parameter(torch.zeros(6)) for _ in range(n)]
    comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, size=n, rank=j,
                                      named_parameters=[("layer.weight", params[j])],
                                      backend=backend)
             for j in range(n)]
    grads = _grads(n, [(6,)], 5)
    grads[2]["t0"][3] = bad
    for j in range(n):
        params[j].grad = grads[j]["t0"]
    sent = [c.compress(g["t0"]) for c, g in zip(comps, grads)]
    total = allreduce([s[0] for s in sent], op="average")
    for c, s in zip(comps, sent):
        with pytest.raises(C.NonFiniteGradientError,
                           match=r"'layer.weight'.*NaN/Inf in the gradient on 1 of 4 ranks"):
            c.decompress(total.clone(), s[1])


def test_size_mismatch_raises_on_every_rank():
    n = 3
    comps = [C.SignCompressor(size=n, rank=j) for j in range(n)]
    sizes = [20, 21, 20]          # one word either way: only the header can tell
    sent = [c.compress(torch.randn(m)) for c, m in zip(comps, sizes)]
    assert len({s[0].numel() for s in sent}) == 1
    total = allreduce([s[0] for s in sent])
    for c, s in zip(comps, sent):
        with pytest.raises(C.RankMismatchError, match="different sizes"):
            c.decompress(total.clone(), s[1])


def test_wrong_group_or_op_or_modified_wire_is_detected():
    n = 4
    comps = [C.SRCompressor(size=n, rank=j) for j in range(n)]
    sent = [c.compress(torch.randn(300)) for c in comps]
    wires = [s[0] for s in sent]
    cases = {
        "missing rank": (allreduce(wires[:3]), C.RankMismatchError),
        "op=Min": (torch.from_numpy(np.minimum.reduce([w.numpy() for w in wires])),
                   C.RankMismatchError),
        "fp16 cast": (allreduce(wires).half().double(), C.WireError),
        "negated": (-allreduce(wires), C.WireError),
    }
    for what, (total, err) in cases.items():
        with pytest.raises(err):
            comps[0].decompress(total, sent[0][1])
    comps[0].decompress(allreduce(wires), sent[0][1])   # and the real sum decodes


@pytest.mark.parametrize("R", [0, -1.0, float("nan"), float("inf"), "global", None, "1"])
def test_R_must_be_positive(R):
    with pytest.raises(ValueError, match="R must be"):
        C.SRCompressor(R=R)
    with pytest.raises(ValueError, match="R must be"):
        C.S1Compressor(R=R)


def test_bad_options():
    for kw in (dict(tie="heads"), dict(wire="int32"), dict(size=4), dict(size=2, rank=2),
               dict(max_message_words=W.H), dict(size=2 ** 26, rank=0)):
        with pytest.raises(ValueError):
            C.SignCompressor(**kw)


def test_integer_tensors_pass_through():
    c = C.SignCompressor(size=2, rank=0)
    for t in (torch.arange(5), torch.ones(3, dtype=torch.int32), torch.tensor([True, False])):
        w, ctx = c.compress(t)
        assert w is t and c.decompress(w, ctx) is t
    assert c.step == -1


def test_local_R_zero_sends_fair_coins_and_fixed_R_counts_clamps():
    n, d = 3, 30000
    comps = [C.SRCompressor(size=n, rank=j) for j in range(n)]
    outs = simulate(comps, [{"z": torch.zeros(d)} for _ in range(n)])
    frac = (outs[0]["z"] == 1).float().mean().item()
    assert abs(frac - 0.5) < 4 * 0.5 / d ** 0.5, frac
    comps = [C.SRCompressor(size=n, rank=j, R=0.5) for j in range(n)]
    grads = _grads(n, [(1000,)], 9)
    simulate(comps, grads)
    for c, g in zip(comps, grads):
        assert c.stats["clamped"] == int((g["t0"].abs() > 0.5).sum()) > 0


def test_shared_randomness_does_not_depend_on_hook_order():
    """Three same-sized tensors compressed in a different order on each rank: S_1 of the
    signs gives identical results on every rank, equal to a run in one common order."""
    n = 4
    names = ["a", "b", "c"]
    grads = _grads(n, [(50,)] * 3, 11, zeros=0.0)   # (an exact 0's coin is per rank, by k)
    results = []
    for shuffle in (False, True):
        comps = [C.MajorityVoteCompressor(contribute="sign", vote="s1", size=n, rank=j,
                                          seed=3) for j in range(n)]
        per_rank = []
        for j in range(n):
            order = list(np.random.default_rng(j).permutation(3)) if shuffle else [0, 1, 2]
            per_rank.append({names[i]: grads[j][f"t{i}"] for i in order})
        assert not shuffle or len({tuple(g) for g in per_rank}) > 1
        outs = simulate(comps, per_rank)
        for nm in names:
            assert all(torch.equal(outs[0][nm], o[nm]) for o in outs)
        results.append(outs[0])
    for nm in names:
        assert torch.equal(results[0][nm], results[1][nm])


def test_buffers_are_reused_only_once_nothing_holds_them():
    """Decompressed values live in buffers the compressor reuses: never one that a
    result still alive uses (earlier results keep their values), and, once the results
    are dropped, the same memory again rather than new (many same-sized tensors)."""
    comps = [C.MajorityVoteCompressor(contribute="sr", vote="s1", size=2, rank=j, seed=1)
             for j in range(2)]
    grads = _grads(2, [(300,)] * 6, seed=5, zeros=0.0)

    def rank0():
        return list(simulate(comps, grads)[0].values())

    held = rank0()
    kept = [h.clone() for h in held]
    again = rank0()
    first = {h.data_ptr() for h in held}
    assert len(first) == 6 and not first & {a.data_ptr() for a in again}
    for h, k in zip(held, kept):
        assert torch.equal(h, k)
    seen = first | {a.data_ptr() for a in again}
    del held, kept, again
    for _ in range(3):
        assert {t.data_ptr() for t in rank0()} <= seen


def test_step_advances_once_per_compress_phase():
    n = 2
    comps = [C.S1Compressor(size=n, rank=j) for j in range(n)]
    prev = {}
    for step in range(3):
        grads = _grads(n, [(20,), (5,)], step)
        outs = simulate(comps, grads)
        assert all(c.step == step for c in comps)
        for nm in grads[0]:
            R = common_R(prev.get(nm))            # the default R: the previous step's bound
            bits = [oracle_bits(grads[j][nm].numpy(), "sr", seed=0, rank=j, step=step, R=R)
                    for j in range(n)]
            np.testing.assert_array_equal(outs[0][nm].numpy().ravel(),
                                          oracle_vote(bits, "s1", seed=0, step=step))
            prev[nm] = [grads[j][nm].numpy() for j in range(n)]


def test_splitting_needs_horovod_outside_it():
    hw = W.header_words(2, "float64")   # (the named words, settings bins, exponent)
    c = C.SignCompressor(size=2, rank=0, max_message_words=hw + 1, wire="float64")
    with pytest.raises(ValueError, match="needs Horovod"):
        c.compress(torch.randn(1000))
    assert W.split(1000, 2, "float64", hw + 1) == [(o, min(24, 1000 - o))
                                                    for o in range(0, 1000, 24)]


# --------------------------------------------------------------------------------------
# Real Horovod: an ordinary training script under horovodrun -np 4 and mpirun -np 3
# --------------------------------------------------------------------------------------

STEPS = 200
NP3_CONFIGS = "sign_avg,sr_sum,s1_predivide,sr_process_set"


@pytest.fixture(scope="module")
def job4():
    return launch("hvd_compressors.py", 4, launcher="horovodrun", args=[STEPS], timeout=400)


@pytest.fixture(scope="module")
def job3():
    return launch("hvd_compressors.py", 3, launcher="mpirun", args=[STEPS, NP3_CONFIGS],
                  timeout=400)


JOBS = [pytest.param("job4", marks=[requires_horovod, pytest.mark.multirank,
                                    pytest.mark.horovod]),
        pytest.param("job3", marks=[requires_horovod, pytest.mark.multirank,
                                    pytest.mark.horovod])]


def _configs(job):
    return sorted({k.split("|")[0] for k in job[0] if k.endswith("|params")})


@pytest.mark.parametrize("jobname", JOBS)
def test_hvd_training_loss_falls_and_ranks_stay_identical(jobname, request):
    job = request.getfixturevalue(jobname)
    names = _configs(job)
    want = NP3_CONFIGS.split(",") if jobname == "job3" else None
    assert want is None or sorted(want) == names
    assert len(names) >= 4
    for nm in names:
        group = list(job[0][f"{nm}|group"])
        loss0, loss1 = job[0][f"{nm}|loss"]
        assert loss1 < 0.6 * loss0, (nm, loss0, loss1)
        for r in range(len(job)):
            has = f"{nm}|params" in job[r]
            assert has == (r in group), (nm, r)
            if has:
                np.testing.assert_array_equal(job[r][f"{nm}|params"], job[0][f"{nm}|params"],
                                              err_msg=f"{nm}: rank {r} differs from rank 0")


@pytest.mark.parametrize("jobname", JOBS)
def test_hvd_every_step_matches_the_oracle(jobname, request):
    job = request.getfixturevalue(jobname)
    checked = 0
    for nm in _configs(job):
        group = [int(r) for r in job[0][f"{nm}|group"]]
        contribute, vote, tie, R, seed, _ = job[0][f"{nm}|spec"]
        R = R if R in ("local", "common") else float(R)
        params = sorted({k.split("|")[1] for k in job[0] if k.startswith(nm + "|")
                         and k.endswith("|g")})
        for p in params:
            steps = job[group[0]][f"{nm}|{p}|step"]
            np.testing.assert_array_equal(steps, np.arange(STEPS))
            for t in range(STEPS):
                Rt = R if R != "common" else common_R(
                    None if t == 0 else [job[r][f"{nm}|{p}|g"][t - 1] for r in group])
                bits = [oracle_bits(job[r][f"{nm}|{p}|g"][t], contribute, seed=int(seed),
                                    rank=i, step=t, k=int(job[r][f"{nm}|{p}|k"][t]), R=Rt)
                        for i, r in enumerate(group)]
                want = oracle_vote(bits, vote, tie, seed=int(seed), step=t)
                for r in group:
                    got = job[r][f"{nm}|{p}|o"][t]
                    if not np.array_equal(got, want):
                        raise AssertionError(f"{nm} {p} step {t} rank {r}: "
                                             f"{int((got != want).sum())} coordinates differ")
                checked += 1
    assert checked >= 4 * 4 * STEPS


def test_hvd_hook_order_differs_between_ranks_yet_all_agree(job4):
    order = [list(job4[r]["s1_hook_order|order"]) for r in range(4)]
    assert order[0] != order[1], "the two-branch model should fire hooks in another order"
    assert sorted(order[0]) == sorted(order[1])
    ks = [job4[r]["s1_hook_order|s1_hook_order.a.weight|k"] for r in range(2)]
    assert not np.array_equal(ks[0], ks[1])   # the per-rank index k did differ


@pytest.mark.parametrize("jobname", JOBS)
def test_hvd_split_messages_and_clamp_stats(jobname, request):
    job = request.getfixturevalue(jobname)
    for nm in _configs(job):
        tensors, coords, messages, wire_bytes, clamped = job[0][f"{nm}|stats"]
        n = len(job[0][f"{nm}|group"])
        assert coords == STEPS * (2410 if "hook" not in nm else 2250)
        if "split" in nm:
            assert messages > tensors
        else:
            assert messages == tensors
            wire = str(job[0][f"{nm}|spec"][5])
            assert wire_bytes == 8 * sum(W.message_words(d, n, wire) for d in
                                         ((2048, 32, 320, 10) if "hook" not in nm else
                                          (1024, 16, 1024, 16, 160, 10))) * STEPS
        assert (clamped > 0) == ("fixedR" in nm)


@pytest.mark.parametrize("jobname", JOBS)
def test_hvd_functional_allreduce_shapes_dtypes_ops(jobname, request):
    job = request.getfixturevalue(jobname)
    n = len(job)
    cases = sorted({int(k.split("|")[1]) for k in job[0] if k.startswith("fn|")})
    assert len(cases) == 32
    kinds, ops = set(), set()
    for i in cases:
        kind, opname, dtype, out_dtype, out_shape, in_shape = job[0][f"fn|{i}|meta"]
        kinds.add(kind)
        ops.add(opname)
        assert out_dtype == dtype and out_shape == in_shape
        contribute, vote = KINDS[kind]
        bits = [oracle_bits(job[r][f"fn|{i}|g"], contribute, seed=100 + i, rank=r, step=0)
                for r in range(n)]
        want = oracle_vote(bits, vote, seed=100 + i, step=0)
        for r in range(n):
            np.testing.assert_array_equal(job[r][f"fn|{i}|o"].ravel(), want,
                                          err_msg=f"case {i}: {kind} {opname} {dtype}")
    assert kinds == set(KINDS) and len(ops) == 4
    for r in range(n):
        np.testing.assert_array_equal(job[r]["int|o"], n * np.arange(5) + n * (n - 1) // 2)
        assert str(job[r]["int|dtype"]) == "torch.int64"
        assert job[r]["worst|ok"].all()


ERRORS = {
    "nan": r"NonFiniteGradientError: SignCompressor: gradient 'nan\.fc\d\.(weight|bias)'.*"
           r"NaN/Inf in the gradient on 1 of \d ranks",
    "split_hook_order": r"RankMismatchError: SignCompressor: gradient 'sho\.[ab]\.weight'.*"
                        r"summed with another tensor's message",
    "size_same_words": r"RankMismatchError: .*ranks hold different sizes",
    "size_other_words": r"HorovodInternalError: Mismatched ALLREDUCE tensor shapes",
    "op_min": r"RankMismatchError: .*use op=hvd.Sum or hvd.Average",
    "int64_average": r"WireError: .*int64 wire needs op=hvd.Sum",
    "wrong_group": r"RankMismatchError: .*process_set",
    "after_errors": r"^no error$",
}


@pytest.mark.parametrize("jobname", JOBS)
def test_hvd_bad_input_raises_on_every_rank(jobname, request):
    job = request.getfixturevalue(jobname)
    for what, pattern in ERRORS.items():
        ranks = [0, 2] if what == "wrong_group" else range(len(job))
        for r in ranks:
            msg = str(job[r][f"err|{what}"])
            assert re.search(pattern, msg), f"{what} on rank {r}: {msg}"
