"""The statistics the paper's proofs use (issue 15, item 1), checked by sampling.

The other tests pin the code bit for bit against oracles that reuse its formulas; these
check the laws themselves, so a wrong-but-consistent change (S_R's probability with
v/R instead of v/(2R), ranks sharing a noise stream, a vote whose tie coins repeat)
fails here.  Every check is a z-score against the exact law: fixed seeds, and a
tolerance of Z = 5.5 standard deviations (per coordinate, or per pooled statistic),
where the standard deviation is computed from the law itself (binomial or the exact
fourth moment), never fitted.  Each test is parametrised with planted bugs, marked
``xfail(strict=True)``: the same check run on a buggy pipeline must fail, or the test
suite fails ("XPASS(strict)").

Ranks are emulated in this process with the public kernels where that is exactly the
pipeline (each rank's ``stochastic_sign_pack`` with its own stream key, then
``majority_vote`` with the step's shared key, as ``signcomm.vote`` documents), and run
for real (``tests/workers/stat_pipeline.py``, ``stat_optim.py``) for the whole pipeline:
shared R, every schedule, the optimizer.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import signcomm
from harness import launch
from signcomm import kernels as K
from signcomm.vote import SCHEDULES, SignVote, safe_r, vote_keys

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from stat_inputs import M, M_ZERO, SCALE_C, SEED, rank_values  # noqa: E402

Z = 5.5  # z-score bound; P(|N(0,1)| > 5.5) = 4e-8 per check
STEP = 5
# one compute thread per rank; an MPICH rank that waits sleeps after each idle poll
# instead of spinning, leaving the shared cores to the ranks still computing
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
              "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
              "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1"}


def planted(name, reason=""):
    """A parametrisation that runs the test on a planted bug: it must fail."""
    return pytest.param(name, marks=pytest.mark.xfail(
        strict=True, raises=AssertionError,
        reason=f"planted bug {name!r}: the check must catch it. {reason}"), id=f"bug-{name}")


def z_check(observed, expected, var, count, what):
    """max over entries of |observed - expected| / sd < Z, sd = sqrt(var / count); a
    variance floor of 1/count keeps the normal approximation honest near p = 0 or 1."""
    observed, expected, var = (np.asarray(a, np.float64) for a in (observed, expected, var))
    sd = np.sqrt((np.maximum(var, 0) + 1.0 / count) / count)
    z = np.abs(observed - expected) / sd
    k = int(np.argmax(z))
    assert z[k] < Z, (f"{what}: entry {k} observed {observed.flat[k]:.5f}, law "
                      f"{expected.flat[k]:.5f} (z = {z[k]:.1f}, sd {sd.flat[k]:.5f}, "
                      f"{count} draws)")


def rank_key(rank, step=STEP):
    """Rank ``rank``'s S_R stream at ``step`` (docs/kernels.md: STOCHASTIC_SIGN, own rank)."""
    return K.key64(SEED, K.stream_id(K.Purpose.STOCHASTIC_SIGN, rank), step)


def pm1(packed, d):
    """Packed bits -> +1/-1 floats."""
    return K.unpack_bits(packed, d).astype(np.float64) * 2 - 1


# ---------------------------------------------------------------------------------------
# the laws
# ---------------------------------------------------------------------------------------
def count_pmf(p):
    """Poisson-binomial: P(c = i) for i = 0..n, c = number of ranks whose bit is +1,
    rank j's bit +1 with probability p[j] (p: (n, m) -> (n+1, m))."""
    p = np.atleast_2d(np.asarray(p, np.float64))
    pmf = np.zeros((p.shape[0] + 1, p.shape[1]))
    pmf[0] = 1.0
    for pj in p:
        pmf[1:] = pmf[1:] * (1 - pj) + pmf[:-1] * pj
        pmf[0] *= 1 - pj
    return pmf


def v1_law(p, tie):
    """(P(o = +1), P(o = 0), E[o]) of the v1 vote (eq. 10) with its tie rule."""
    pmf = count_pmf(p)
    n = pmf.shape[0] - 1
    c = np.arange(n + 1)[:, None]
    win, lose, tied = ((pmf * (2 * c > n)).sum(0), (pmf * (2 * c < n)).sum(0),
                       (pmf * (2 * c == n)).sum(0))
    if tie == "coin":
        return win + tied / 2, np.zeros_like(win), win - lose
    return win, tied, win - lose


def sr_prob(v, r):
    """P(S_R(v) = +1) = (R + v) / (2R), clamped to [0, 1] (Definition 1)."""
    return np.clip(0.5 + np.asarray(v, np.float64) / (2 * r), 0.0, 1.0)


def check_vote_law(stats, vs, r, rule, T, what):
    """stats: dict mean/plus/zero per coordinate over T replicas; vs: (n, m) inputs;
    r: the shared R.  v2: E[o] = mean_j(v_j) / R.  v1: P(o=+1) (and P(o=0) under
    tie="zero") = the Poisson-binomial majority law of p_j = (1 + v_j/R)/2."""
    variant, tie = rule
    p = sr_prob(vs, r)
    if variant == "v2":
        mu = np.mean(np.asarray(vs, np.float64), 0) / r
        z_check(stats["mean"], mu, 1 - mu ** 2, T, f"{what}: E[o] = mean(v)/R")
        return
    plus, zero, mu = v1_law(p, tie)
    z_check(stats["plus"], plus, plus * (1 - plus), T, f"{what}: P(o=+1)")
    z_check(stats["zero"], zero, zero * (1 - zero), T, f"{what}: P(o=0)")
    var = plus + (1 - plus - zero) - mu ** 2
    z_check(stats["mean"], mu, var, T, f"{what}: E[o]")


def stats_of(o):
    """o: (T, m) -> per-coordinate mean, share of +1, share of 0."""
    return dict(mean=o.mean(0), plus=(o > 0).mean(0), zero=(o == 0).mean(0))


# ---------------------------------------------------------------------------------------
# 1. E[S_R(v)] = v / R, per coordinate, clamped coordinates and R = 0 included
# ---------------------------------------------------------------------------------------
SR_V = np.array([-3.0, -1.0, -0.999, -0.6, -0.25, -0.01, 0.0, 0.0, 0.03, 0.2, 0.5, 0.77, 0.999,
                 1.0, 1.5, 40.0], np.float32)
SR_R = 1.0


@pytest.mark.parametrize("impl", ["signcomm", planted("v_over_R", "P(+1) = 1/2 + v/R instead "
                                                      "of 1/2 + v/(2R): E = 2v/R"),
                                  planted("clamp_flipped", "a clamped coordinate takes the "
                                          "opposite sign")])
def test_sr_mean_is_v_over_r(impl):
    """S_R (eq. 8) over T = 20000 replicas of 16 coordinates, in two tensors with their
    own R (1 and 1000): the mean of every coordinate is v/R within 5.5 sd; clamped
    coordinates (|v| > R) are exactly sign(v) and counted as clamped."""
    T = 20000
    v = np.concatenate([np.tile(SR_V, T), np.tile(SR_V * 1000, T)])
    seg, r = [T * SR_V.size, T * SR_V.size], np.array([SR_R, 1000 * SR_R])
    rr = r / 2 if impl == "v_over_R" else r
    packed, clamped = K.stochastic_sign_pack(v, rr, rank_key(0), seg_sizes=seg)
    o = pm1(packed, v.size).reshape(2, T, SR_V.size)
    if impl == "clamp_flipped":
        o[:, :, np.abs(SR_V) > SR_R] *= -1
    want = np.clip(SR_V / SR_R, -1, 1)
    for s in range(2):
        mean = o[s].mean(0)
        z_check(mean, want, 1 - want ** 2, T, f"tensor {s} (R = {r[s]:g}): E[S_R(v)] = v/R")
        outside = np.abs(SR_V) > SR_R
        assert np.array_equal(mean[outside], np.sign(SR_V[outside])), "clamped: exactly sign(v)"
    assert clamped == 2 * T * int((np.abs(SR_V) > SR_R).sum())


@pytest.mark.parametrize("impl", ["signcomm", planted("zero_packs_minus", "R = 0 sent as "
                                                      "sign(0) = -1 (no coin)")])
def test_r_zero_is_a_fair_coin(impl):
    """R = 0 only happens for an all-zero tensor (R is a max of |v|).  The kernel refuses
    it; the vote layer maps it to R = 1 (``signcomm.vote.safe_r``), so every coordinate
    of that tensor is S_R(0), a fair coin: mean 0.  Through ``SignVote.pack`` (shared R,
    one process), next to a tensor with a signal that keeps its v/R."""
    with pytest.raises(ValueError, match="positive"):
        K.stochastic_sign_pack(np.zeros(8, np.float32), 0.0, rank_key(0))
    assert np.array_equal(safe_r([0.0, 2.5]), [1.0, 2.5])
    T = 20000
    a = np.tile(SR_V[np.abs(SR_V) <= 1], T)
    v = np.concatenate([np.zeros(T * 64, np.float32), a])
    sv = SignVote("mpi", schedule="allgather", R="global", seed=SEED)
    if impl == "signcomm":
        packed = sv.pack(v, STEP, seg_sizes=[T * 64, a.size])
        assert np.array_equal(sv.last_r, [1.0, 1.0])
    else:
        packed = K.pack_signs(v)
    o = pm1(packed, v.size)
    zero_part = o[:T * 64]
    z_check([zero_part.mean()], [0.0], [1.0], zero_part.size, "all-zero tensor: E[o] = 0")
    z_check(zero_part.reshape(T, 64).mean(0), np.zeros(64), np.ones(64), T,
            "all-zero tensor, per coordinate")


# ---------------------------------------------------------------------------------------
# 2. the whole vote on n heterogeneous ranks, emulated with the public kernels
# ---------------------------------------------------------------------------------------
RULES = [("v1", "coin"), ("v1", "zero"), ("v2", "coin")]


def emulate(n, rule, T, *, bug=None, step=STEP):
    """n ranks' S_R (each its own stream, shared R = max over ranks) and the vote, as
    the schedules do it; replicas at positions t*M + k.  Returns (o (T, M), inputs, R)."""
    variant, tie = rule
    vs = np.stack([rank_values(j, n) for j in range(n)])
    r = float(np.abs(vs).max())
    rows = []
    for j in range(n):
        rj = {"local_R": float(np.abs(vs[j]).max()), "half_R": r / 2}.get(bug, r)
        key = rank_key(0 if bug == "shared_stream" else j, step)
        rows.append(K.stochastic_sign_pack(np.tile(vs[j], T), rj, key)[0])
    tie_key, s1_key = vote_keys(SEED, step)
    vote = K.majority_vote(np.stack(rows), T * M, variant=variant, tie=tie,
                           key=s1_key if variant == "v2" else tie_key)
    o = vote.values(T * M, np.float64).reshape(T, M)
    if bug == "tie_plus":  # Bernstein's rule: a tie (sign(0)) counts as +1
        o[o == 0] = 1
    return o, vs, r


EMULATED = [(n, rule, "signcomm") for n in (1, 2, 3, 4, 5, 8) for rule in RULES
            if not (n % 2 and rule[1] == "zero")]


def planted_case(n, rule, bug, reason=""):
    return pytest.param(n, rule, bug, id=f"n{n}-{rule[0]}-{rule[1]}-bug-{bug}",
                        marks=pytest.mark.xfail(
                            strict=True, raises=AssertionError,
                            reason=f"planted bug {bug!r}: the check must catch it. {reason}"))


EMULATED = [pytest.param(*case, id=f"n{case[0]}-{case[1][0]}-{case[1][1]}") for case in EMULATED]
EMULATED += [planted_case(3, ("v1", "coin"), "shared_stream", "every rank draws rank 0's noise"),
             planted_case(4, ("v1", "zero"), "shared_stream"),
             planted_case(4, ("v2", "coin"), "local_R", "each rank its own R: mean_j(v_j/R_j)"),
             planted_case(5, ("v1", "coin"), "local_R"),
             planted_case(3, ("v2", "coin"), "half_R", "P(+1) = 1/2 + v/R"),
             planted_case(4, ("v1", "zero"), "tie_plus", "a tie counts as +1")]


@pytest.mark.parametrize("n,rule,impl", EMULATED)
def test_vote_law_emulated_ranks(n, rule, impl):
    """E[o | v_1..v_n] = mean_j(v_j)/R (v2) and the Poisson-binomial majority law (v1)
    for n = 1..8 heterogeneous ranks (T = 6000 replicas of 16 coordinates)."""
    T = 6000
    o, vs, r = emulate(n, rule, T, bug=None if impl == "signcomm" else impl)
    check_vote_law(stats_of(o), vs, r, rule, T, f"n={n} {rule}")


def test_median_and_mean_differ_on_these_inputs():
    """The inputs are the case the paper argues about: for some coordinates the sign of
    the ranks' mean differs from the sign of their median (what sign-of-sign voting
    follows), so the v2 law above is not the median's law in disguise."""
    for n in (3, 4, 5, 8):
        vs = np.stack([rank_values(j, n) for j in range(n)])
        assert (np.sign(vs.mean(0)) != np.sign(np.median(vs, 0))).any(), n


# ---------------------------------------------------------------------------------------
# 3. the same laws through the real pipeline: n ranks, shared R, every schedule
# ---------------------------------------------------------------------------------------
PIPE_T, PIPE_STEPS = 4000, 100


@pytest.fixture(scope="module", params=[3, 4], ids=["n3", "n4"])
def pipeline(request):
    n = request.param
    return n, launch("stat_pipeline.py", n, args=[PIPE_T, PIPE_STEPS], timeout=240, env=ONE_THREAD)


PIPE_CASES = [(s, rule) for s in SCHEDULES for rule in RULES]


@pytest.mark.multirank
@pytest.mark.parametrize("schedule,rule", PIPE_CASES,
                         ids=[f"{s}-{r[0]}-{r[1]}" for s, r in PIPE_CASES])
def test_vote_law_real_ranks(pipeline, schedule, rule):
    """For every schedule: the same law on every tensor of the bucket, each with its own
    shared R: A (heterogeneous values), C = 50 x A (E[o] the same as A's: R is per
    tensor), Z (all zeros: R = 0 -> fair coins, E[o] = 0, and P(o=+1) = P(fair vote))."""
    n, job = pipeline
    name = f"{schedule}-{rule[0]}-{rule[1]}"
    for r in range(1, n):  # every rank the same vote
        assert job[r][name + "-crc"] == job[0][name + "-crc"], f"{name}: rank {r} differs"
    res = job[0]
    vs = np.stack([rank_values(j, n) for j in range(n)]).astype(np.float64)
    r_a = float(np.abs(vs).max())
    np.testing.assert_allclose(res[name + "-R"], [r_a, 1.0, SCALE_C * r_a], rtol=1e-6)
    get = lambda seg: {k: res[f"{name}-{seg}-{k}"] for k in ("mean", "plus", "zero")}  # noqa: E731
    check_vote_law(get("A"), vs, r_a, rule, PIPE_T, f"n={n} {name} tensor A")
    check_vote_law(get("C"), vs * SCALE_C, SCALE_C * r_a, rule, PIPE_T, f"n={n} {name} tensor C")
    check_vote_law(get("Z"), np.zeros((n, M_ZERO)), 1.0, rule, PIPE_T, f"n={n} {name} zeros")


# ---------------------------------------------------------------------------------------
# 4. independence: the variance of the mean of S_R contributions is 1/n
# ---------------------------------------------------------------------------------------
def variance_ratio(a, mu_j):
    """a: (T, m) mean over n ranks of +1/-1 contributions; mu_j: (n, m) each rank's
    E[S_R] = v_j/R.  Returns (observed / predicted pooled variance of a, its sd), with
    predicted Var(a) = sum_j (1 - mu_j^2) / n^2 (independent ranks) and the sd from the
    exact fourth moment of a sum of independent two-point variables."""
    n = mu_j.shape[0]
    s = 1 - mu_j ** 2                                   # Var of one rank's +-1
    p = (1 + mu_j) / 2
    m4 = p * (1 - mu_j) ** 4 + (1 - p) * (1 + mu_j) ** 4
    var = s.sum(0) / n ** 2
    e4 = (m4.sum(0) + 3 * (s.sum(0) ** 2 - (s ** 2).sum(0))) / n ** 4
    T = a.shape[0]
    sq = (a - mu_j.mean(0)) ** 2
    ratio = sq.mean(0).sum() / var.sum()
    sd = np.sqrt(((e4 - var ** 2) / T).sum()) / var.sum()
    return ratio, sd


@pytest.mark.parametrize("impl", ["signcomm", planted("shared_stream", "all ranks draw the "
                                                      "same noise: Var = 1 - mu^2, flat in n"),
                                  planted("paired_streams", "ranks 2i and 2i+1 share a stream")])
def test_variance_of_mean_contribution_scales_as_1_over_n(impl):
    """a = mean over n ranks of S_R(v_j) at one coordinate: Var(a) = sum_j(1 - mu_j^2)/n^2,
    i.e. (1 - mu^2)/n for equal inputs, for n = 1, 2, 4, 8, 16 (each rank its own
    stream), within 5.5 sd of the pooled estimate over T = 4000 replicas x 16 coordinates."""
    T = 4000
    for n in (1, 2, 4, 8, 16):
        vs = np.stack([rank_values(j % 4, 4) * (0.5 if j >= 4 else 1.0) for j in range(n)])
        r = float(np.abs(vs).max())
        rows = []
        for j in range(n):
            stream = {"shared_stream": 0, "paired_streams": j // 2}.get(impl, j)
            rows.append(K.stochastic_sign_pack(np.tile(vs[j], T), r, rank_key(stream))[0])
        c = K.vote_counts(np.stack(rows), T * M).astype(np.float64).reshape(T, M)
        ratio, sd = variance_ratio((2 * c - n) / n, vs / r)
        assert abs(ratio - 1) < Z * sd, (f"n={n}: Var(mean of S_R) / (sum(1-mu^2)/n^2) = "
                                         f"{ratio:.3f}, expected 1 +- {Z * sd:.3f}")


@pytest.mark.multirank
def test_variance_real_ranks(pipeline):
    """The same on real ranks: each rank's own packed S_R contribution (SignVote.pack,
    global R), gathered by the test: Var of their mean = sum_j(1 - mu_j^2)/n^2."""
    n, job = pipeline
    d = PIPE_T * M
    bits = np.stack([pm1(job[r]["contribution"], d).reshape(PIPE_T, M) for r in range(n)])
    vs = np.stack([rank_values(j, n) for j in range(n)]).astype(np.float64)
    r = float(job[0]["contribution-R"][0])
    assert r == pytest.approx(float(np.abs(vs).max()), rel=1e-6)
    ratio, sd = variance_ratio(bits.mean(0), vs / r)
    assert abs(ratio - 1) < Z * sd, f"n={n}: variance ratio {ratio:.3f} +- {Z * sd:.3f}"
    # and each rank's contribution has mean v_j / R
    for j in range(n):
        mu = vs[j] / r
        z_check(bits[j].mean(0), mu, 1 - mu ** 2, PIPE_T, f"rank {j}: E[S_R(v_j)] = v_j/R")


# ---------------------------------------------------------------------------------------
# 5. no correlation across steps or between neighbouring coordinates
# ---------------------------------------------------------------------------------------
def check_uncorrelated(o, mu, var, what, lags=((0, 1),)):
    """o: (steps, d) values with per-coordinate law mu, var (d,).  For each lag
    (step lag, coordinate lag) the mean product of the standardised residuals over all
    pairs is 0 within Z / sqrt(pairs) (independent: each product has variance 1).
    Pairs are all (t, p) with t + dt < steps and p + dp < d."""
    zres = (o - mu) / np.sqrt(np.maximum(var, 1e-12))
    for dt, dp in lags:
        a = zres[:zres.shape[0] - dt, :zres.shape[1] - dp]
        b = zres[dt:, dp:]
        corr = float((a * b).mean())
        bound = Z / np.sqrt(a.size)
        assert abs(corr) < bound, (f"{what}: correlation at lag (step {dt}, coordinate {dp}) "
                                   f"= {corr:.4f} over {a.size} pairs (bound {bound:.4f})")


def tie_coin_votes(steps, d, bug=None):
    """The v1 vote of n = 2 ranks that disagree everywhere: every coordinate is a tie,
    so o is the shared tie coin (bit p % 64 of the TIE_COIN word at p // 64)."""
    nbytes = K.packed_nbytes(d)
    rows = np.stack([np.full(nbytes, 0xFF, np.uint8), np.zeros(nbytes, np.uint8)])
    K.clear_padding(rows[0], d)
    out = []
    pos = np.arange(d, dtype=np.uint64)
    for s in range(steps):
        key = vote_keys(SEED, 0 if bug == "no_step" else s)[0]
        if bug in (None, "no_step"):
            vote = K.majority_vote(rows, d, variant="v1", tie="coin", key=key)
            out.append(vote.values(d, np.float64))
        elif bug == "one_word":  # every 64-coordinate word reuses word 0
            w = K.random_words(key, np.zeros(d, np.uint64))
            out.append(((w >> (pos & np.uint64(63))) & np.uint64(1)).astype(np.float64) * 2 - 1)
        elif bug == "pairs":  # neighbours share a bit
            w = K.random_words(key, pos >> np.uint64(6))
            bit = (w >> ((pos >> np.uint64(1)) & np.uint64(63))) & np.uint64(1)
            out.append(bit.astype(np.float64) * 2 - 1)
    return np.stack(out)


@pytest.mark.parametrize("impl", ["signcomm",
                                  planted("one_word", "all words are word 0: p and p+64 equal"),
                                  planted("pairs", "coordinates 2i, 2i+1 share a coin"),
                                  planted("no_step", "the coins do not change with the step")])
def test_tie_coins_uncorrelated(impl):
    """Tie coins (one SplitMix64 word per 64 coordinates): fair, and uncorrelated between
    neighbours inside a word (p, p+1), across a word boundary (p % 64 = 63), at the same
    bit of neighbouring words (p, p+64), and across steps; 8 steps x 131072 ties."""
    steps, d = 8, 64 * 2048
    o = tie_coin_votes(steps, d, None if impl == "signcomm" else impl)
    mu, var = np.zeros(d), np.ones(d)
    z_check([o.mean()], [0.0], [1.0], o.size, "tie coins: fair")
    check_uncorrelated(o, mu, var, "tie coins", lags=((1, 0), (0, 64)))
    inner = (np.arange(d - 1) % 64) != 63
    prod = o[:, :-1] * o[:, 1:]
    for sel, what in ((inner, "inside a word"), (~inner, "across a word boundary")):
        x = prod[:, sel]
        assert abs(x.mean()) < Z / np.sqrt(x.size), f"tie coins {what}: corr {x.mean():.4f}"


@pytest.mark.multirank
def test_votes_uncorrelated_across_steps_real_ranks(pipeline):
    """o_t of the real pipeline (allgather, global R) over 100 consecutive steps, 2048
    coordinates (128 replicas of the 16 inputs): every rank the same; the standardised
    o_t uncorrelated with o_{t+1} (same coordinate), with the next coordinate (same
    step, including across replicas and 64-bit words) and with the coordinate 64 on."""
    n, job = pipeline
    vs = np.stack([rank_values(j, n) for j in range(n)]).astype(np.float64)
    r = float(np.abs(vs).max())
    d = 128 * M
    for variant in ("v1", "v2"):
        for rk in range(1, n):
            assert np.array_equal(job[rk][f"steps-{variant}"], job[0][f"steps-{variant}"])
        o = np.stack([pm1(b, d) for b in job[0][f"steps-{variant}"]])
        mu = (np.tile(vs.mean(0) / r, 128) if variant == "v2"
              else np.tile(v1_law(sr_prob(vs, r), "coin")[2], 128))
        check_uncorrelated(o, mu, 1 - mu ** 2, f"n={n} {variant}",
                           lags=((1, 0), (0, 1), (0, 64), (2, 0)))
        z_check(o.mean(0).reshape(128, M).mean(0), mu[:M], 1 - mu[:M] ** 2, o.shape[0] * 128,
                f"n={n} {variant}: E[o] over steps")


@pytest.mark.parametrize("impl", ["signcomm", planted("no_step", "every step draws step 0's "
                                                      "noise and coins")])
def test_votes_uncorrelated_across_steps_emulated(impl):
    """The same check on emulated ranks (n = 4, v1 and v2), with a planted bug that
    freezes the step: o_t = o_0 must be caught."""
    n, steps = 4, 60
    for rule in (("v1", "coin"), ("v2", "coin")):
        o = np.stack([emulate(n, rule, 128, step=0 if impl == "no_step" else s)[0].reshape(-1)
                      for s in range(steps)])
        vs = np.stack([rank_values(j, n) for j in range(n)]).astype(np.float64)
        r = float(np.abs(vs).max())
        mu = np.tile(vs.mean(0) / r if rule[0] == "v2" else v1_law(sr_prob(vs, r), "coin")[2], 128)
        check_uncorrelated(o, mu, 1 - mu ** 2, f"emulated {rule}", lags=((1, 0), (0, 1)))


# ---------------------------------------------------------------------------------------
# 6. tie rules: coin and zero have the same expected update
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["signcomm", planted("tie_plus", "ties -> +1 (Bernstein)"),
                                  planted("tie_minus", "ties -> -1 (sign packed without a coin)")])
def test_tie_rules_same_expectation(impl):
    """n = 2 and 4 heterogeneous ranks, the same S_R bits voted with tie="coin" and
    tie="zero": both match the law E[o] = P(c > n/2) - P(c < n/2), and their difference
    (the coins at the ties) has mean 0 within 5.5 sd (sd^2 = P(tie) / T)."""
    T = 20000
    for n in (2, 4):
        o_coin, vs, r = emulate(n, ("v1", "coin"), T)
        o_zero, _, _ = emulate(n, ("v1", "zero"), T)
        if impl != "signcomm":
            o_zero[o_zero == 0] = 1 if impl == "tie_plus" else -1
        plus, tied, mu = v1_law(sr_prob(vs, r), "zero")
        assert (tied > 0.05).any(), "the inputs must tie often enough to matter"
        z_check(o_coin.mean(0) - o_zero.mean(0), np.zeros(M), tied, T,
                f"n={n}: E[o_coin] - E[o_zero]")
        z_check(o_zero.mean(0), mu, plus + (1 - plus - tied) - mu ** 2, T, f"n={n}: E[o_zero]")
        z_check(o_coin.mean(0), mu, 1 - mu ** 2, T, f"n={n}: E[o_coin]")


# ---------------------------------------------------------------------------------------
# 7. a coordinate whose gradient is always 0: random walk of variance lr^2 t
# ---------------------------------------------------------------------------------------
LR = 0.01


def check_walk(snaps, times, lr, what, step_var=1.0):
    """snaps: (len(times), D) positions after t steps from 0 of D independent walks with
    +-lr steps of mean 0 and variance step_var lr^2: mean 0 within 5.5 sd
    (sd = lr sqrt(step_var t / D)) and variance step_var lr^2 t within 5.5 sd
    (sd of the sample variance of a near-normal walk: lr^2 t step_var sqrt(2 / D))."""
    for x, t in zip(snaps, times):
        x = np.asarray(x, np.float64)
        D = x.size
        want = step_var * lr ** 2 * t
        assert abs(x.mean()) < Z * np.sqrt(want / D), \
            f"{what}: drift {x.mean() / lr:.2f} lr after {t} steps"
        got = float((x ** 2).mean())
        assert abs(got / want - 1) < Z * np.sqrt(2 / D), (
            f"{what}: variance after {t} steps {got / lr ** 2:.1f} lr^2, "
            f"law {want / lr ** 2:.1f} lr^2")


def optimizer_walk(preset, D, times, **options):
    x = torch.nn.Parameter(torch.zeros(D))
    y = torch.nn.Parameter(torch.zeros(D))  # half the coordinates of y have a gradient
    opt = signcomm.create_optimizer(preset, [x, y], lr=LR, seed=SEED, transport="mpi", **options)
    gen = torch.Generator().manual_seed(0)
    snaps = []
    for t in range(1, max(times) + 1):
        x.grad = torch.zeros(D)
        g = torch.randn(D, generator=gen)
        g[D // 2:] = 0
        y.grad = g
        opt.step()
        if t in times:
            snaps.append(np.concatenate([x.detach().numpy(), y.detach().numpy()[D // 2:]]))
    return snaps


def kernel_walk(D, times, bug):
    """Walks driven by a buggy zero rule, from the public kernels."""
    x, snaps = np.zeros(D), []
    for t in range(1, max(times) + 1):
        if bug == "zero_is_minus":  # sign(0) packed without its coin
            bits = K.pack_signs(np.zeros(D, np.float32))
        else:  # "coin_per_run": the coins do not change with the step
            bits = K.pack_signs(np.zeros(D, np.float32), zero_key=rank_key(0, 0))
        x -= LR * pm1(bits, D)
        if t in times:
            snaps.append(x.copy())
    return snaps


WALKERS = ["mvsm-v1", "mvsm-v2", "signsgd-mv", "sto-signsgd",
           planted("zero_is_minus", "drifts +lr per step"),
           planted("coin_per_run", "coins fixed for the run: variance lr^2 t^2")]


@pytest.mark.parametrize("impl", WALKERS)
def test_zero_gradient_random_walk(impl):
    """Under MVSM (one process: the vote of one rank is its own S_R bit; a fair coin when
    v = 0, whether the whole tensor is 0 and R = 0 -> 1, or R > 0 from other
    coordinates) and the sign presets (the zero coin), x_t of a zero-gradient coordinate
    has mean 0 and variance lr^2 t: it drifts zero on average and spreads as lr sqrt(t).
    12288 coordinates, t = 16 and 64."""
    D, times = 8192, (16, 64)
    if impl in ("zero_is_minus", "coin_per_run"):
        snaps = kernel_walk(D + D // 2, times, impl)
    else:
        snaps = optimizer_walk(impl, D, times)
    check_walk(snaps, times, LR, impl)


def test_zero_gradient_does_not_move_under_single_node_signum():
    """Single-node Signum / signSGD: sign(0) = 0, so the coordinate stays exactly put."""
    for name in ("signum", "signsgd"):
        x = torch.nn.Parameter(torch.full((64,), 0.25))
        opt = signcomm.create_optimizer(name, [x], lr=LR)
        for _ in range(50):
            x.grad = torch.zeros(64)
            opt.step()
        assert torch.equal(x.detach(), torch.full((64,), 0.25)), name


# ---------------------------------------------------------------------------------------
# 8. the optimizer end to end on real ranks: R="local", fixed R, tie="zero"; the walk
# ---------------------------------------------------------------------------------------
OPT_N, OPT_STEPS = 2, 60


@pytest.fixture(scope="module")
def optim_job():
    return launch("stat_optim.py", OPT_N, args=[OPT_STEPS], timeout=240, env=ONE_THREAD)


@pytest.mark.multirank
@pytest.mark.parametrize("run", ["v1-local", "v2-local", "v1-fixed", "v1-tie-zero"])
def test_optimizer_options_train(optim_job, run):
    """A short training run (softmax regression on digits, label-skewed shares over 2
    ranks, 60 steps): the full training loss falls by a third, every rank ends with the
    same parameters, and the fixed R = 0.05 clamps (its counter is used)."""
    loss0, loss1 = optim_job[0][f"{run}-loss"]
    assert np.isfinite(loss1) and loss1 < 0.67 * loss0, (run, loss0, loss1)
    for r in range(1, OPT_N):
        np.testing.assert_array_equal(optim_job[r][f"{run}-params"], optim_job[0][f"{run}-params"])
    clamped = int(optim_job[0][f"{run}-clamped"])
    assert (clamped > 0) == (run == "v1-fixed"), (run, clamped)


@pytest.mark.multirank
@pytest.mark.parametrize("walk", ["mvsm-v1", "mvsm-v1-tie-zero", "mvsm-v2", "signsgd-mv"])
def test_zero_gradient_random_walk_real_ranks(optim_job, walk):
    """Zero gradient on both ranks: a random walk of variance lr^2 t (every rank's bit a
    fair coin, the vote of fair coins a fair coin); with tie="zero" a tie (probability
    1/2 for 2 fair coins) does not move, so the variance is lr^2 t / 2."""
    snaps = optim_job[0][f"walk-{walk}"]
    for r in range(1, OPT_N):
        np.testing.assert_array_equal(optim_job[r][f"walk-{walk}"], snaps)
    check_walk(snaps, (16, 64), LR, walk, step_var=0.5 if walk.endswith("tie-zero") else 1.0)
