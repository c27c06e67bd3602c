"""Issue 18 for the compressors: settings that differ across ranks raise on every rank,
naming the setting; a NaN batch can be skipped and training goes on.

- in-process: n ranks simulated with ``size=``/``rank=`` and the NumPy allreduce of
  tests/test_compressors.py: each setting (kind, seed, tie, R policy, a fixed R) that
  differs on one rank raises ``RankMismatchError`` on every rank on every wire and
  scaling; the settings bins stay exact up to n = 1000 under Average and pre/postscale; a
  NaN step raises on every rank and leaves the compressors as a run that never saw it;
- real Horovod (``mpirun -np 4`` of tests/workers/hvd_agreement.py): the same mismatches
  through ``hvd.allreduce`` and a DistributedOptimizer, the matched case against the
  oracle of tests/test_compressors.py; a NaN on rank 1 at batch 3 of 7 under a
  DistributedOptimizer (SGD with momentum; ``step()``, ``synchronize()`` + ``step()``,
  ``op=hvd.Sum``, ``num_groups``): every rank gets the error, nothing is updated,
  ``zero_grad()`` and the next batches work, and the parameters equal, bit for bit on every
  rank, those of the same run without that batch.
"""
import re

import numpy as np
import pytest
import torch

import compressors as C
from compressors import settings as S, wire as W
from conftest import requires_horovod
from harness import launch
from signcomm import kernels as K
from test_compressors import KINDS, allreduce, oracle_bits, oracle_vote

N = 3
# name: (options of ranks 0 and 2, options of rank 1, the setting the error names)
MISMATCHES = {
    "kind": (dict(contribute="sr"), dict(contribute="sr", vote="s1"), "kind"),
    "kind_sign": (dict(), dict(contribute="sr"), "kind"),
    "seed": (dict(seed=5), dict(seed=5 + 2 ** 63), "seed"),
    "tie": (dict(), dict(tie="zero"), "tie"),
    "R_local": (dict(contribute="sr"), dict(contribute="sr", R="local"), "R"),
    "R_fixed": (dict(contribute="sr", R=0.5), dict(contribute="sr", R=0.5000001), "R"),
    "R_fixed_common": (dict(contribute="sr"), dict(contribute="sr", R=2.0), "R"),
    "tie_and_seed": (dict(), dict(tie="zero", seed=1), "tie, seed"),
}
SCALED = [("float64", dict(op="average", pre=1 / 3, post=3.0)),
          ("float64-radix", dict(op="average")), ("int64", dict(op="sum")),
          ("int64-radix", dict(op="sum"))]


def _compress(opts_per_rank, d=50, seed=0, **kw):
    comps = [C.MajorityVoteCompressor(size=len(opts_per_rank), rank=j, **o, **kw)
             for j, o in enumerate(opts_per_rank)]
    grads = [torch.tensor(np.random.default_rng([seed, j]).standard_normal(d),
                          dtype=torch.float32) for j in range(len(comps))]
    return comps, [c.compress(g) for c, g in zip(comps, grads)]


@pytest.mark.parametrize("case", list(MISMATCHES))
@pytest.mark.parametrize("wire,scaling", SCALED)
def test_a_differing_setting_raises_on_every_rank_naming_it(case, wire, scaling):
    same, other, setting = MISMATCHES[case]
    comps, sent = _compress([same, other, same], wire=wire)
    total = allreduce([w for w, _ in sent], **scaling)
    for j, (c, (_, ctx)) in enumerate(zip(comps, sent)):
        with pytest.raises(C.RankMismatchError) as err:
            c.decompress(total.clone(), ctx)
        msg = str(err.value)
        names = setting.split(", ")
        for name in names:
            assert re.search(rf"\b{name} differs across ranks", msg), msg
        mine = c.settings
        assert f"This rank ({j}) has " + ", ".join(
            f"{k}={dict(kind=mine.kind, tie=mine.tie, R=mine.R, seed=mine.seed)[k]!r}"
            for k in names) in msg, msg
    if setting in ("kind", "tie", "R") and not case.startswith("R_fixed"):
        # one-hot settings: the count of each value
        a, b = (S.Settings(**{**dict(contribute="sign", vote="sign", tie="coin",
                                     R="common", seed=0), **o}) for o in (same, other))
        value = {"kind": lambda s: s.kind, "tie": lambda s: s.tie, "R": lambda s: s.policy}
        want = f"{value[setting](a)!r} on 2, {value[setting](b)!r} on 1 of 3 ranks"
        want_rev = f"{value[setting](b)!r} on 1, {value[setting](a)!r} on 2 of 3 ranks"
        assert want in msg or want_rev in msg, msg


def test_matched_settings_decode_as_before():
    """Same options everywhere (here with values whose bins are mostly set): no error, and
    the oracle's vote."""
    opts = dict(contribute="sr", vote="s1", R=float.fromhex("0x1.fffffffffffffp+1"),
                seed=2 ** 64 - 1)
    comps, sent = _compress([opts] * N, d=70, seed=3)
    total = allreduce([w for w, _ in sent], op="average")
    grads = [np.random.default_rng([3, j]).standard_normal(70).astype(np.float32)
             for j in range(N)]
    bits = [oracle_bits(grads[j], "sr", seed=2 ** 64 - 1, rank=j, step=0, R=opts["R"])
            for j in range(N)]
    want = oracle_vote(bits, "s1", seed=2 ** 64 - 1, step=0)
    for c, (_, ctx) in zip(comps, sent):
        np.testing.assert_array_equal(c.decompress(total.clone(), ctx).numpy(), want)


def test_a_settings_region_that_passed_is_not_decoded_again_and_a_changed_one_raises(
        monkeypatch):
    """The summed settings bins that passed are remembered (later tensors skip their
    decode), but only those exact words under that scale and this rank's settings: a
    rank that changes a setting later still makes every rank raise, naming it."""
    from signcomm.kernels import fields as codec
    decoded = []
    real = codec.decode_layout

    def counting(words, d, *args, **kw):
        decoded.append(d)
        return real(words, d, *args, **kw)

    monkeypatch.setattr(codec, "decode_layout", counting)
    monkeypatch.setattr(W, "_SETTINGS_PASSED", {})
    opts = dict(contribute="sr", vote="s1", seed=11)
    for scaling in (dict(op="average"), dict(op="sum")):
        comps, sent = _compress([opts] * N, d=40)
        total = allreduce([w for w, _ in sent], **scaling)
        for t in range(3):   # three tensors of a step: one settings decode per rank
            for c, (_, ctx) in zip(comps, sent):
                c.decompress(total.clone(), ctx)
            settings_decodes = decoded.count(S.BINS)
            assert settings_decodes == (1 if t == 0 else 0), (scaling, t, decoded)
            decoded.clear()
    comps, sent = _compress([opts, dict(opts, seed=12), opts], d=40)
    total = allreduce([w for w, _ in sent], op="average")
    for c, (_, ctx) in zip(comps, sent):
        with pytest.raises(C.RankMismatchError, match="seed differs across ranks"):
            c.decompress(total.clone(), ctx)


def test_settings_that_change_nothing_are_not_compared():
    """tie under S_1 and R under sign contributions do not change the result."""
    for a, b in ((dict(vote="s1"), dict(vote="s1", tie="zero")),
                 (dict(), dict(R=0.5)), (dict(), dict(R="local"))):
        comps, sent = _compress([a, b, a])
        total = allreduce([w for w, _ in sent])
        for c, (_, ctx) in zip(comps, sent):
            c.decompress(total.clone(), ctx)


@pytest.mark.parametrize("n", [2, 16, 255, 1000])
def test_settings_bins_are_exact_for_many_ranks_under_scaling(n):
    """One bit of the seed differs on one rank of n: found under every wire and scaling."""
    rng = np.random.default_rng(n)
    base = S.Settings("sr", "s1", "coin", 0.25, int(rng.integers(0, 2 ** 63)))
    odd = S.Settings("sr", "s1", "coin", 0.25, base.seed ^ (1 << 63))
    for wire in W.WIRES:
        try:
            W.layout(n, wire)
        except ValueError:
            continue
        scalings = [dict(op="average", pre=1 / 7, post=7.0), dict(op="sum")] \
            if W.is_float(wire) else [dict(op="sum")]
        d = 9
        packed = K.pack_bits(rng.random(d) < 0.5)
        for bad in (None, n // 2):
            msgs = [torch.from_numpy(W.encode(packed, 0, d, n, j, step=0, nonfinite=0,
                                              nonce=1, wire=wire,
                                              settings=odd if j == bad else base)[0])
                    for j in range(n)]
            for sc in scalings:
                total = allreduce(msgs, order=list(rng.permutation(n)), **sc).numpy()
                counts = np.empty(d, W.count_dtype(n))
                if bad is None:
                    W.decode(total, d, n, 0, counts, wire=wire, settings=base)
                    assert (counts == n * K.unpack_bits(packed, d)).all()
                else:
                    with pytest.raises(C.RankMismatchError, match="seed differs"):
                        W.decode(total, d, n, 0, counts, wire=wire, settings=base)


def test_header_grows_by_the_settings_words_only():
    for n in (2, 4, 8, 1000):
        for wire in W.WIRES:
            assert W.settings_words(n, wire) == -(-S.BINS // W.fields_per_word(n, wire))
            assert W.header_words(n, wire) >= W.NAMED + W.settings_words(n, wire) + 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_nan_step_raises_everywhere_and_changes_nothing(kind):
    """Rank 1 has a NaN in one of two tensors at step 2 of 6: every rank raises (no
    DistributedOptimizer here: at once, from decompress), and the compressors then go
    on exactly as those of a run without that step (step counter, common R, votes)."""
    n, bad = 4, 2
    contribute, vote = KINDS[kind]
    shapes = [(40,), (9,)]

    def grads(t):
        return [{f"t{i}": torch.tensor(np.random.default_rng([t, j, i]).standard_normal(s)
                                       * (1 + 3 * j), dtype=torch.float32)
                 for i, s in enumerate(shapes)} for j in range(n)]

    def run(with_bad):
        comps = [C.MajorityVoteCompressor(contribute=contribute, vote=vote, size=n, rank=j,
                                          seed=11) for j in range(n)]
        outs = []
        for t in range(6):
            if t == bad and not with_bad:
                continue
            g = grads(t)
            if t == bad:
                g[1]["t1"][4] = float("nan")
            sent = [{nm: c.compress(x) for nm, x in gj.items()} for c, gj in zip(comps, g)]
            step = {}
            for nm in g[0]:
                total = allreduce([s[nm][0] for s in sent], op="average")
                if t == bad and nm == "t1":
                    for c, s in zip(comps, sent):
                        with pytest.raises(C.NonFiniteGradientError, match="on 1 of 4 ranks"):
                            c.decompress(total.clone(), s[nm][1])
                    continue
                step[nm] = [c.decompress(total.clone(), s[nm][1]) for c, s in zip(comps, sent)]
            if t != bad:
                outs.append(step)
        return comps, outs

    comps_a, outs_a = run(True)
    comps_b, outs_b = run(False)
    assert len(outs_a) == len(outs_b) == 5
    for sa, sb in zip(outs_a, outs_b):
        for nm in sa:
            for oa, ob in zip(sa[nm], sb[nm]):
                assert torch.equal(oa, ob)
    for ca, cb in zip(comps_a, comps_b):
        assert ca.step == cb.step == 4 and ca.bounds() == cb.bounds()


# --------------------------------------------------------------------------------------
# Real Horovod
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job():
    return launch("hvd_agreement.py", 4, launcher="mpirun", timeout=240)


def hvd_test(fn):
    return pytest.mark.horovod(pytest.mark.multirank(requires_horovod(fn)))


# case: (the setting, the value seen on each rank)
HVD_CASES = {
    "kind": ("kind", ["sr", "sr", "s1", "s1"], "'sr' on 2, 's1' on 2 of 4 ranks"),
    "kind_sign_sr": ("kind", ["sign", "sr", "sign", "sign"], "'sign' on 3, 'sr' on 1 of 4"),
    "seed": ("seed", [0, 0, 7, 0], None),
    "seed_int64": ("seed", [2 ** 40, 0, 0, 0], None),
    "tie": ("tie", ["coin", "zero", "coin", "coin"], "'coin' on 3, 'zero' on 1 of 4"),
    "R_local": ("R", ["common", "common", "common", "local"], "'common' on 3, 'local' on 1"),
    "R_value": ("R", [0.5, 0.25, 0.25, 0.25], "different fixed values"),
    "R_fixed_common": ("R", ["common", "common", 0.5, "common"], "'common' on 3, 'fixed' on 1"),
    "opt_seed": ("seed", [0, 1, 0, 0], None),
}


@hvd_test
def test_hvd_each_differing_setting_raises_on_every_rank(job):
    for case, (setting, values, seen) in HVD_CASES.items():
        for r in range(4):
            msg = str(job[r][f"err|{case}"])
            assert msg.startswith("RankMismatchError: "), (case, r, msg)
            assert f"{setting} differs across ranks" in msg, (case, r, msg)
            assert f"This rank ({r}) has {setting}={values[r]!r}" in msg, (case, r, msg)
            assert seen is None or seen in msg, (case, r, msg)
        assert "'mm.fc2.bias'" in str(job[0]["err|opt_seed"])   # named by the optimizer


@hvd_test
def test_hvd_matched_settings_give_the_oracle_and_nothing_hangs(job):
    bits = [oracle_bits(job[r]["matched|g"], "sr", seed=3, rank=r, step=0, R=0.5)
            for r in range(4)]
    want = oracle_vote(bits, "s1", seed=3, step=0)
    for r in range(4):
        assert str(job[r]["err|matched"]) == "no error"
        np.testing.assert_array_equal(job[r]["res|matched"], want)
        assert str(job[r]["err|after"]) == "no error"
        np.testing.assert_array_equal(job[r]["res|after"], np.ones(5))


NAN_RUNS = {"sign_step": "sign_step.0.fc1.bias", "sr_sync_sum": "sr_sync_sum.0.fc2.bias",
            "s1_step": "s1_step.0.fc2.bias", "s1_groups": "s1_groups.0.fc2.bias"}


@hvd_test
def test_hvd_a_nan_batch_is_skipped_and_training_goes_on(job):
    for name, tensor in NAN_RUNS.items():
        errors = [list(job[r][f"nan|{name}|errors"]) for r in range(4)]
        assert len(errors[0]) == 1, (name, errors[0])
        err = errors[0][0]
        assert err.startswith("3: ") and f"gradient '{tensor}'" in err, err
        assert "NaN/Inf in the gradient on 1 of 4 ranks" in err, err
        assert "skipped this batch" in err, err
        assert ("3 more tensor(s)" in err) == (name == "sign_step"), err
        for r in range(4):
            assert errors[r] == errors[0], (name, r)           # the same error everywhere
            assert bool(job[r][f"nan|{name}|unchanged"]), (name, r)   # nothing updated
            assert int(job[r][f"nan|{name}|steps_after"]) == 3, (name, r)
            np.testing.assert_array_equal(job[r][f"nan|{name}|params"],
                                          job[0][f"nan|{name}|params"])
            np.testing.assert_array_equal(job[r][f"nan|{name}|params"],
                                          job[r][f"nan|{name}|oracle"],
                                          err_msg=f"{name} rank {r}: not the run without batch 3")
