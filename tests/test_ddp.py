"""signcomm.ddp (MVSM as a DDP communication hook) and the torch.distributed transport,
on real gloo ranks: the oracle contract (DDP + hook + SGD(lr) == signcomm's optimizer,
bit for bit, every step), DDP's bucket rebuild, no_sync() accumulation, checkpoints, bad
input; the training script under torchrun."""
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from harness import ROOT, launch
from signcomm.comm import TransportError, get_transport

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from ddp_common import CASES  # noqa: E402

import signcomm.ddp  # noqa: E402
from signcomm.ddp import MVSMHookState, resolve_options  # noqa: E402

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# -- the oracle contract on 2, 3 and 4 ranks ------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"n{n}")
def oracle_job(request):
    job = launch("ddp_oracle.py", request.param, launcher="torch", timeout=600, env=ONE_THREAD)
    job.n = request.param
    return job


def test_ddp_hook_equals_the_optimizer_bit_for_bit(oracle_job):
    job = oracle_job
    for k, (method, opts, fu) in enumerate(CASES):
        for r in range(job.n):
            eq = job[r][f"eq-{k}"]
            assert eq.shape[0] >= 20
            assert eq.all(), (f"case {k} {method} {opts} find_unused={fu}: rank {r} differs "
                              f"from the optimizer first at step {int(np.argmin(eq))}")
            assert np.array_equal(job[r][f"params-{k}"].view(np.uint32),
                                  job[0][f"params-{k}"].view(np.uint32)), f"case {k}: ranks differ"
        assert bool(job[0][f"moved-{k}"]), f"case {k}: nothing moved"


# -- DDP around the hook, 2 ranks -----------------------------------------------------------
@pytest.fixture(scope="module")
def features():
    job = launch("ddp_features.py", 2, launcher="torch", timeout=600, env=ONE_THREAD)
    return job


def test_transport_none_picks_torch_distributed(features):
    assert all(str(features[r]["auto-transport"]) == "TorchDistTransport" for r in range(2))


def test_bucket_rebuild_changes_nothing(features):
    for r in range(2):
        f = features[r]
        assert f["rebuild_eq"].all()
        assert bool(f["rebuild_same"]), "small buckets (rebuilt) and one bucket differ"
        assert bool(f["buckets_changed"]) and int(f["buckets_later"]) > 1  # DDP did rebuild
        assert int(f["buckets_one"]) == 1


def test_no_sync_accumulation(features):
    for r in range(2):
        assert features[r]["nosync-0"].all() and features[r]["nosync-1"].all()


def test_gradient_as_bucket_view_and_static_graph(features):
    for r in range(2):
        assert features[r]["option-view"].all() and features[r]["option-static"].all()


def test_half_precision_parameters(features):
    for r in range(2):
        assert features[r]["dtype-float16"].all() and features[r]["dtype-bfloat16"].all()


def test_checkpoint_resume_equals_uninterrupted(features):
    for r in range(2):
        assert bool(features[r]["resume_same"])
        assert int(features[r]["resume_step"]) == 9
        assert bool(features[r]["pickle_same"])


def test_nan_on_one_rank_fails_every_rank_and_updates_nothing(features):
    for fu in (0, 1):
        mine = str(features[1][f"nan-err-{fu}"])
        other = str(features[0][f"nan-err-{fu}"])
        assert "RemoteRankError" in mine and "non-finite gradient" in mine
        assert "nothing was updated" in mine
        assert "RemoteRankError" in other and "rank 1 failed" in other
        assert all(bool(features[r][f"nan-unchanged-{fu}"]) for r in range(2))


def test_ranks_that_disagree_fail_on_every_rank(features):
    for r in range(2):
        opts = str(features[r]["mm-options"])
        assert "RankMismatchError" in opts and "seed" in opts, opts
        method = str(features[r]["mm-method"])
        assert "RankMismatchError" in method and "method" in method, method
        model = str(features[r]["mm-model"])
        assert "same model across all ranks" in model, model


def test_process_group_without_the_collectives(features):
    for r in range(2):
        err = str(features[r]["bad-group"])
        assert err.startswith("TransportError") and "all_to_all_single" in err, err
        assert "'gloo'" in err, err


# -- single process ---------------------------------------------------------------------------
def test_method_names_and_options():
    assert resolve_options("mvsm-v2", {})[1]["variant"] == "v2"
    assert resolve_options("MVSM_v1", dict(beta=0.2, tie="zero"))[1]["beta"] == 0.2
    with pytest.raises(ValueError, match="unknown method 'adamw'; choose one of signsgd-mv"):
        MVSMHookState(method="adamw")
    with pytest.raises(ValueError, match="single-process optimizer"):
        MVSMHookState(method="signum")
    with pytest.raises(ValueError, match="does not take lr.*SGD"):
        MVSMHookState(method="mvsm-v1", lr=0.1)
    with pytest.raises(ValueError, match="weight decay is the optimizer's"):
        MVSMHookState(method="mvsm-v1", weight_decay=0.1)
    with pytest.raises(ValueError, match="mvsm-v2 fixes tie"):          # the preset lock
        MVSMHookState(method="mvsm-v2", tie="zero")
    with pytest.raises(ValueError, match="signsgd-mv fixes R"):
        MVSMHookState(method="signsgd-mv", R="local")
    with pytest.raises(TypeError, match="unknown option 'momentum'"):
        MVSMHookState(method="mvsm-v1", momentum=0.9)
    with pytest.raises(ValueError, match="schedule must be one of"):
        MVSMHookState(method="mvsm-v1", schedule="ring")


def test_state_pickles_and_needs_attaching():
    st = MVSMHookState(method="sto-signsgd", seed=3)
    st.momentum[2] = torch.ones(3)
    st2 = pickle.loads(pickle.dumps(st))
    assert st2.method == "sto-signsgd" and st2.options["seed"] == 3 and st2.stateless
    assert torch.equal(st2.momentum[2], torch.ones(3))
    with pytest.raises(RuntimeError, match="not attached"):
        signcomm.ddp.hook(st2, object())
    sd = st.state_dict()
    st3 = MVSMHookState(method="sto-signsgd", seed=3)
    st3.load_state_dict(sd)
    assert st3.step == 0 and torch.equal(st3.momentum[2], torch.ones(3))
    with pytest.raises(ValueError, match="checkpoint is for 'sto-signsgd'"):
        MVSMHookState(method="mvsm-v1").load_state_dict(sd)


def test_torch_transport_without_a_process_group():
    import torch.distributed as dist
    assert not dist.is_initialized()
    with pytest.raises(TransportError, match=re.escape("init_process_group('gloo')")):
        get_transport("torch")
    with pytest.raises(ValueError, match="'torch'"):
        get_transport("tcp")


# -- the training script under torchrun ------------------------------------------------------
TRAIN = ROOT / "mpi_examples" / "train.py"


def test_train_under_torchrun_trains_through_the_hook():
    job = launch(TRAIN, 2, launcher="torchrun", args=["--method", "mvsm-v1", "--epochs", 2],
                 timeout=600, env=ONE_THREAD, need_results=False)
    last = [line for line in job.output.splitlines() if line.strip()][-1]
    m = re.search(r"^final: mvsm-v1 on 2 rank\(s\), 2 epochs: test accuracy ([0-9.]+)", last)
    assert m, job.output
    assert float(m.group(1)) > 0.6, last          # chance is 0.1 (10 digits)
    assert "engine torch" in job.output and "29.5x as much" in last


def test_train_ddp_baselines_and_bad_input():
    job = launch(TRAIN, 2, launcher="torch", timeout=600, env=ONE_THREAD, need_results=False,
                 args=["--grid", "method=ddp-fp32,ddp-fp16,ddp-powersgd", "--epochs", 1,
                       "--train-samples", 600, "--no-full-grad", "--progress", "none"])
    rows = {line.split()[0].split("_")[0]: line.split() for line in job.output.splitlines()
            if line.startswith("ddp-")}
    assert set(rows) == {"ddp-fp32", "ddp-fp16", "ddp-powersgd"}, job.output
    ratio = {k: float(v[-1].rstrip("x")) for k, v in rows.items()}
    assert ratio["ddp-fp32"] == 1.0 and ratio["ddp-fp16"] == 0.5 and ratio["ddp-powersgd"] < 0.3
    assert all(float(v[1]) > 0.3 for v in rows.values()), job.output
    bad = launch(TRAIN, 2, launcher="torch", timeout=300, env=ONE_THREAD, need_results=False,
                 expect_failure=True, args=["--method", "mvsm-v3"])
    assert bad.output.count("unknown method 'mvsm-v3'") == 1, bad.output   # rank 0 only
    assert "ddp-powersgd" in bad.output and "Traceback" not in bad.output
