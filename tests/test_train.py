"""mpi_examples/train.py end to end: real training on digits under mpirun, horovodrun and
one process; ranks identical; the metrics file; bad input; the CIFAR unpickler; plots.

Launches are few and grouped (one --plan of several runs per launch), so the file stays
within a few minutes on a 2-core machine."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_horovod
from harness import ROOT, launch

sys.path.insert(0, str(ROOT))
from mpi_examples import data as D  # noqa: E402
from mpi_examples import methods as M  # noqa: E402
from mpi_examples import metrics as MET  # noqa: E402

TRAIN = ROOT / "mpi_examples" / "train.py"
CHANCE = 0.1  # ten digit classes


VOTE = list(M.VOTE_METHODS)


def run_cli(*args, timeout=120):
    """train.py as one plain process (no MPI launcher)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT), env=env)


def read_runs(out_dir):
    runs = {}
    for path in sorted(Path(out_dir).glob("*.jsonl")):
        recs = MET.read_metrics(path)
        cfg = next(r for r in recs if r["type"] == "config")
        runs[cfg["run_id"]] = recs
    return runs


def epochs_of(recs):
    return [r for r in recs if r["type"] == "epoch"]


def plan_file(tmp, runs):
    path = Path(tmp) / "plan.json"
    path.write_text(json.dumps(runs))
    return path


def assert_trained(recs, min_acc=3 * CHANCE):
    ep = epochs_of(recs)
    first, last = ep[0], ep[-1]
    assert first["epoch"] == 0 and last["epoch"] >= 1
    assert last["train_loss"] < first["train_loss"] - 0.2, (first["train_loss"], last["train_loss"])
    assert last["test_acc"] > min_acc, last["test_acc"]


def assert_ranks_identical(job, n_runs):
    for i in range(n_runs):
        ref = job[0][f"params_{i}"]
        assert np.isfinite(ref).all()
        for r in range(1, len(job)):
            np.testing.assert_array_equal(job[r][f"params_{i}"], ref,
                                          err_msg=f"run {job[0]['run_ids'][i]}: rank {r} differs")


# ---------------------------------------------------------------------------------------
# mpirun, 4 ranks: a baseline and every majority-vote method in one launch
# ---------------------------------------------------------------------------------------
MPI_N = 4


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpi")
    plan = [{"method": "sgdm"}]
    plan += [{"method": m} for m in VOTE]
    # harder settings get a few more steps
    plan += [{"method": "mvsm-v1", "byzantine": 1, "lr": 0.01, "epochs": 4},
             {"method": "mvsm-v2", "heterogeneous": True, "lr": 0.01, "epochs": 4}]
    job = launch(ROOT / "tests" / "workers" / "train_worker.py", MPI_N,
                 launcher="mpirun", timeout=240,
                 args=["--plan", plan_file(tmp, plan), "--epochs", 2, "--batch-size", 32,
                       "--out-dir", tmp / "runs"])
    return job, read_runs(tmp / "runs"), plan


def _find(runs, method, **extra):
    for run_id, recs in runs.items():
        cfg = recs[0]
        if cfg["method"] == method and all(cfg[k] == v for k, v in extra.items()) and \
                all(not cfg[k] for k in ("byzantine", "heterogeneous") if k not in extra):
            return recs
    raise AssertionError(f"no run of {method} {extra} in {sorted(runs)}")


@pytest.mark.multirank
def test_mpirun_baseline_trains_over_mpi4py(mpi_runs):
    job, runs, plan = mpi_runs
    recs = _find(runs, "sgdm")
    assert recs[0]["engine"] == "mpi" and recs[0]["ranks"] == MPI_N
    assert_trained(recs)
    assert_ranks_identical(job, len(plan))
    # fp32 ring allreduce: exactly 2 (n-1)/n * 4d bytes per step, as the ledger counts
    cfg, last = recs[0], epochs_of(recs)[-1]
    steps = last["step"]
    assert last["bytes_sent_total"] == cfg["fp32_allreduce_bytes_per_step"] * steps
    assert cfg["fp32_allreduce_bytes_per_step"] == 2 * (MPI_N - 1) * 4 * cfg["num_params"] // MPI_N


@pytest.mark.multirank
@pytest.mark.parametrize("method", VOTE)
def test_mpirun_vote_method_trains(mpi_runs, method):
    job, runs, _ = mpi_runs
    recs = _find(runs, method)
    assert_trained(recs)
    cfg, last = recs[0], epochs_of(recs)[-1]
    # one bit per coordinate: far below the fp32 allreduce of the same gradients
    assert 0 < last["bytes_sent_total"] < cfg["fp32_allreduce_bytes_per_step"] * last["step"] / 4
    assert last["time_compress_s"] > 0 and last["time_comm_s"] > 0


@pytest.mark.multirank
def test_mpirun_byzantine_and_heterogeneous_still_train(mpi_runs):
    _, runs, _ = mpi_runs
    assert_trained(_find(runs, "mvsm-v1", byzantine=1), min_acc=2 * CHANCE)
    assert_trained(_find(runs, "mvsm-v2", heterogeneous=True), min_acc=2 * CHANCE)


@pytest.mark.multirank
def test_mpirun_all_ranks_identical(mpi_runs):
    job, _, plan = mpi_runs
    assert len(job) == MPI_N and list(job[0]["run_ids"]) == list(job[1]["run_ids"])
    assert_ranks_identical(job, len(plan))


# ---------------------------------------------------------------------------------------
# horovodrun, 3 ranks: fp32 through hvd.DistributedOptimizer, a vote method over the
# Horovod transport, the Horovod compressors
# ---------------------------------------------------------------------------------------
HVD_N = 3


@pytest.fixture(scope="module")
def hvd_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hvd")
    plan = [{"method": "sgdm"}, {"method": "adamw"}, {"method": "mvsm-v2"},
            {"method": "signsgd-mv"}]
    plan += [{"method": m} for m in M.COMPRESSOR_METHODS]
    job = launch(ROOT / "tests" / "workers" / "train_worker.py", HVD_N, launcher="horovodrun",
                 timeout=240, args=["--plan", plan_file(tmp, plan), "--epochs", 2,
                                    "--batch-size", 32, "--out-dir", tmp / "runs"])
    return job, read_runs(tmp / "runs"), plan


@pytest.mark.multirank
@pytest.mark.horovod
@requires_horovod
def test_horovodrun_baselines(hvd_runs):
    job, runs, plan = hvd_runs
    for method in ("sgdm", "adamw"):
        recs = _find(runs, method)
        assert recs[0]["engine"] == "horovod" and recs[0]["wire"] == "fp32 allreduce (Horovod)"
        assert_trained(recs)
    assert_ranks_identical(job, len(plan))


@pytest.mark.multirank
@pytest.mark.horovod
@requires_horovod
@pytest.mark.parametrize("method", ["mvsm-v2", "signsgd-mv"])
def test_horovodrun_vote_methods(hvd_runs, method):
    _, runs, _ = hvd_runs
    recs = _find(runs, method)
    assert recs[0]["engine"] == "horovod"
    assert_trained(recs)


@pytest.mark.multirank
@pytest.mark.horovod
@requires_horovod
@pytest.mark.parametrize("method", M.COMPRESSOR_METHODS)
def test_horovodrun_compressors(hvd_runs, method):
    _, runs, _ = hvd_runs
    recs = _find(runs, method)
    assert_trained(recs, min_acc=2 * CHANCE)
    last = epochs_of(recs)[-1]
    assert 0 < last["bytes_sent_total"] < recs[0]["fp32_allreduce_bytes_per_step"] * last["step"]


# ---------------------------------------------------------------------------------------
# one process: the centralized methods, step metrics
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    plan = [{"method": "sgdm"}, {"method": "adamw"}, {"method": "signum"}, {"method": "signsgd"}]
    # one compute thread: the tiny CNN gains nothing from two, and OpenMP threads spin
    # badly when other jobs load the machine
    job = launch(ROOT / "tests" / "workers" / "train_worker.py", 1, launcher="python",
                 timeout=180, env={"OMP_NUM_THREADS": "1"}, args=["--plan", plan_file(tmp, plan), "--epochs", 2,
                                    "--batch-size", 32, "--out-dir", tmp / "runs",
                                    "--step-metrics"])
    return job, read_runs(tmp / "runs"), tmp / "runs"


@pytest.mark.parametrize("method", ["sgdm", "adamw", "signum", "signsgd"])
def test_single_process_methods_train(single_runs, method):
    _, runs, _ = single_runs
    recs = _find(runs, method)
    assert recs[0]["ranks"] == 1
    assert_trained(recs)


def test_metrics_file_has_documented_fields(single_runs):
    _, runs, _ = single_runs
    recs = _find(runs, "sgdm")
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "config" and kinds[-1] == "summary"
    cfg = recs[0]
    for key in ("method", "lr", "beta", "seed", "ranks", "engine", "num_params",
                "steps_per_epoch", "fp32_allreduce_bytes_per_step", "run_id"):
        assert key in cfg, key
    epochs = epochs_of(recs)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:
        assert set(MET.EPOCH_FIELDS) <= set(e), set(MET.EPOCH_FIELDS) - set(e)
        assert 0 <= e["train_acc"] <= 1 and 0 <= e["test_acc"] <= 1
        assert e["grad_l1"] >= e["grad_l2"] > 0
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) == cfg["steps_per_epoch"] * 2
    for s in steps:
        assert set(MET.STEP_FIELDS) <= set(s)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    summary = recs[-1]
    assert summary["final_test_acc"] == epochs[-1]["test_acc"]


def test_full_gradient_is_the_full_batch_gradient(single_runs, mpi_runs):
    """Epoch 0's grad norms equal an independent computation of the gradient of the
    mean loss over the whole training set at the initial parameters, and the 4-rank
    run (same seed) measures the same thing."""
    import torch
    import torch.nn.functional as F
    from mpi_examples import models as MOD

    _, runs, _ = single_runs
    e0 = epochs_of(_find(runs, "sgdm"))[0]
    ds = D.load_digits()
    torch.manual_seed(0)
    model = MOD.build("cnn", ds.shape, 10)
    loss = F.cross_entropy(model(torch.from_numpy(ds.x_train)), torch.from_numpy(ds.y_train))
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    assert e0["grad_l1"] == pytest.approx(float(g.abs().sum()), rel=1e-4)
    assert e0["grad_l2"] == pytest.approx(float(g.norm()), rel=1e-4)
    assert e0["train_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    _, mruns, _ = mpi_runs
    m0 = epochs_of(_find(mruns, "sgdm"))[0]
    assert m0["grad_l2"] == pytest.approx(e0["grad_l2"], rel=1e-6)
    assert m0["test_acc"] == e0["test_acc"]


# ---------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------
def test_plot_makes_png(single_runs, tmp_path):
    _, _, run_dir = single_runs
    out = tmp_path / "fig.png"
    proc = subprocess.run([sys.executable, "-m", "signcomm.plot", str(run_dir), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    from signcomm import plot
    groups = plot.group_runs(plot.load_runs([run_dir]))
    assert "sgdm" in groups and len(groups["sgdm"]) == 1
    xs, mean, std = plot.mean_spread(groups["sgdm"], "train_loss")
    assert xs == [0, 1, 2] and std == [0.0, 0.0, 0.0]


def test_plot_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "signcomm.plot", str(tmp_path), "-o",
                           str(tmp_path / "x.png")], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2 and "no metrics files" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plot_mean_and_spread_over_seeds(tmp_path):
    from signcomm import plot
    for seed, losses in ((0, [2.0, 1.0]), (1, [2.0, 3.0])):
        w = MET.MetricsWriter(tmp_path / f"m{seed}.jsonl")
        w.write("config", method="x", seed=seed)
        for e, v in enumerate(losses):
            w.write("epoch", epoch=e, train_loss=v)
        w.close()
    groups = plot.group_runs(plot.load_runs([tmp_path]))
    xs, mean, std = plot.mean_spread(groups["x"], "train_loss")
    assert xs == [0, 1] and mean == [2.0, 2.0] and std == [0.0, 1.0]


# ---------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------
def assert_clean_failure(output, returncode, *needles):
    assert returncode != 0
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output


def test_unknown_method():
    p = run_cli("--method", "adam-mv")
    assert_clean_failure(p.stderr, p.returncode, "unknown method 'adam-mv'", "mvsm-v1")
    assert p.returncode == 2


def test_missing_data_dir(tmp_path):
    p = run_cli("--data", "cifar10", "--data-dir", tmp_path / "nowhere")
    assert_clean_failure(p.stderr, p.returncode, "no such directory", "cifar-10-python.tar.gz",
                         "cifar-10-batches-py")
    p = run_cli("--data", "cifar100", "--data-dir", tmp_path)
    assert_clean_failure(p.stderr, p.returncode, "missing train, test", "cifar-100-python")
    p = run_cli("--data", "cifar10")
    assert_clean_failure(p.stderr, p.returncode, "needs --data-dir")


@pytest.mark.multirank
def test_batch_larger_than_share():
    job = launch(TRAIN, 2, args=["--batch-size", 800, "--epochs", 1], timeout=120,
                 expect_failure=True, need_results=False)
    assert_clean_failure(job.output, job.returncode, "--batch-size 800 is larger than a rank's "
                         "share of the training data (719 samples with 2 ranks)")
    assert job.output.count("larger than a rank's share") == 1  # once, from rank 0


@pytest.mark.multirank
def test_more_ranks_than_samples():
    job = launch(TRAIN, 3, args=["--train-samples", 2, "--epochs", 1], timeout=120,
                 expect_failure=True, need_results=False)
    assert_clean_failure(job.output, job.returncode, "3 ranks but only 2 training samples")


@pytest.mark.multirank
def test_single_process_method_on_many_ranks_is_refused():
    job = launch(TRAIN, 2, args=["--method", "signum", "--epochs", 1], timeout=120,
                 expect_failure=True, need_results=False)
    assert_clean_failure(job.output, job.returncode, "single-process method", "signum-mv")


def test_bad_numbers_are_refused():
    p = run_cli("--beta", "1.5")
    assert_clean_failure(p.stderr, p.returncode, "must be in (0, 1]")
    p = run_cli("--grid", "lr=0.1,-2")
    assert_clean_failure(p.stderr, p.returncode, "--grid lr", "positive")


# ---------------------------------------------------------------------------------------
# CIFAR archives: real layout, restricted unpickler
# ---------------------------------------------------------------------------------------
def write_fake_cifar(root, name="cifar10", per_file=8, seed=0):
    """Archives in the CIFAR python layout (dicts with bytes keys, uint8 (N, 3072) data,
    label lists, file names), pickled with protocol 2 as the originals were."""
    lay = D.CIFAR_LAYOUT[name]
    folder = Path(root) / lay["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for f in lay["train"] + lay["test"]:
        d = {b"batch_label": f.encode(), b"data": rng.integers(0, 256, (per_file, 3072), np.uint8),
             lay["label_key"].encode(): [int(v) for v in rng.integers(0, lay["classes"], per_file)],
             b"filenames": [f"img{i}.png".encode() for i in range(per_file)]}
        (folder / f).write_bytes(pickle.dumps(d, protocol=2))
    return folder


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_archive_loads(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    ds = D.load_cifar("cifar10", tmp_path)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (8, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    write_fake_cifar(tmp_path / "c100", "cifar100")
    ds = D.load_cifar("cifar100", tmp_path / "c100" / "cifar-100-python")
    assert ds.y_train.shape == (8,) and ds.num_classes == 100


def test_unpickler_rejects_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({b"data": Exploit(marker)}, protocol=2))
    with pytest.raises(D.UnsafePickleError, match="refusing to load"):
        D.safe_load_pickle(evil)
    assert not marker.exists()
    # the same file in place of a CIFAR batch: train.py refuses it with a clear message
    folder = write_fake_cifar(tmp_path / "data", "cifar10")
    (folder / "data_batch_3").write_bytes(evil.read_bytes())
    p = run_cli("--data", "cifar10", "--data-dir", tmp_path / "data", "--epochs", 1)
    assert_clean_failure(p.stderr, p.returncode, "data_batch_3", "refusing to load")
    assert not marker.exists()
    # builtins are refused too (eval, getattr, ...)
    for payload in (b"cbuiltins\neval\n(S'1+1'\ntR.", b"cposix\nsystem\n(S'true'\ntR."):
        with pytest.raises(D.UnsafePickleError):
            D.CifarUnpickler(__import__("io").BytesIO(payload)).load()


def test_training_on_cifar_layout_one_process(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", per_file=16)
    p = run_cli("--data", "cifar10", "--data-dir", tmp_path, "--method", "sgdm", "--epochs", 1,
                "--batch-size", 16, "--metrics", tmp_path / "m.jsonl", timeout=180)
    assert p.returncode == 0, p.stderr
    recs = MET.read_metrics(tmp_path / "m.jsonl")
    assert recs[0]["data"] == "cifar10" and recs[0]["train_samples"] == 80


# ---------------------------------------------------------------------------------------
# shards and models (in process)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 8])
def test_shards_equal_disjoint_and_label_skewed(n):
    ds = D.load_digits()
    for het in (False, True):
        shares = [D.shard(ds.y_train, r, n, heterogeneous=het, seed=1) for r in range(n)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(ds.y_train) // n
        allidx = np.concatenate(shares)
        assert len(np.unique(allidx)) == len(allidx)
        if het and n == 8:
            classes = [len(np.unique(ds.y_train[s])) for s in shares]
            assert max(classes) <= 3, classes  # about 10/8 labels each
        if not het and n == 8:
            assert min(len(np.unique(ds.y_train[s])) for s in shares) == 10


def test_models_shapes():
    import torch
    from mpi_examples import models as MOD
    x = torch.zeros(2, 3, 32, 32)
    for name in MOD.MODELS:
        assert MOD.build(name, (3, 32, 32), 100)(x).shape == (2, 100)
    assert MOD.build("cnn", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert 11_000_000 < MOD.count_parameters(MOD.build("resnet18", (3, 32, 32), 10)) < 11_300_000
    assert 23_000_000 < MOD.count_parameters(MOD.build("resnet50", (3, 32, 32), 100)) < 24_000_000


# ---------------------------------------------------------------------------------------
# --split iid|sorted|skew2|dirichlet --alpha, --R (issue 15): shares, configs, a 2-rank run
# ---------------------------------------------------------------------------------------
def test_label_skewed_splits():
    """Equal, disjoint shares for every split; skew2: two label-sorted shards per rank
    (2-4 classes, two shards half the label range apart); dirichlet: each rank dominated
    by few classes, smaller alpha more skewed, the same shares for the same seed."""
    y = D.load_digits().y_train
    n = 8
    for split in D.SPLITS:
        shares = [D.shard(y, r, n, split=split, alpha=0.1, seed=2) for r in range(n)]
        assert len({len(s) for s in shares}) == 1, split
        allidx = np.concatenate(shares)
        assert len(np.unique(allidx)) == len(allidx), split
    top = lambda s: np.bincount(y[s], minlength=10).max() / len(s)  # noqa: E731
    skew2 = [D.shard(y, r, n, split="skew2", seed=2) for r in range(n)]
    assert all(2 <= len(np.unique(y[s])) <= 4 for s in skew2)
    dir01 = [D.shard(y, r, n, split="dirichlet", alpha=0.1, seed=2) for r in range(n)]
    dir10 = [D.shard(y, r, n, split="dirichlet", alpha=10.0, seed=2) for r in range(n)]
    assert np.mean([top(s) for s in dir01]) > 0.4 > np.mean([top(s) for s in dir10])
    again = D.shard(y, 3, n, split="dirichlet", alpha=0.1, seed=2)
    assert np.array_equal(again, dir01[3])
    assert np.array_equal(D.shard(y, 1, n, heterogeneous=True), D.shard(y, 1, n, split="sorted"))
    with pytest.raises(D.DataError, match="alpha must be positive"):
        D.shard(y, 0, n, split="dirichlet", alpha=0.0)


def test_split_and_r_flags_in_configs():
    """run ids and config values of the new flags; --heterogeneous is --split sorted and
    does not combine with another split; bad values are usage errors."""
    from mpi_examples import train as T
    parse = T.build_parser().parse_args
    cfg, = T.expand_runs(parse(["--split", "dirichlet", "--alpha", "0.3", "--R", "local"]))
    assert (cfg.split, cfg.alpha, cfg.R, cfg.heterogeneous) == ("dirichlet", 0.3, "local", True)
    assert "dir0.3" in cfg.run_id() and "Rlocal" in cfg.run_id()
    cfg, = T.expand_runs(parse(["--split", "skew2", "--alpha", "0.3", "--R", "0.05"]))
    assert cfg.alpha is None and cfg.R == 0.05
    assert "skew2_" in cfg.run_id() and "R0.05" in cfg.run_id()
    cfg, = T.expand_runs(parse(["--heterogeneous"]))
    assert cfg.split == "sorted" and "_het_" in cfg.run_id()
    cfg, = T.expand_runs(parse([]))
    assert cfg.split == "iid" and not cfg.heterogeneous
    with pytest.raises(T.UsageError, match="does not combine"):
        T.expand_runs(parse(["--heterogeneous", "--split", "skew2"]))
    with pytest.raises(T.UsageError, match="--grid split"):
        T.expand_runs(parse(["--grid", "split=iid,bogus"]))
    p = run_cli("--split", "bogus")
    assert_clean_failure(p.stderr, p.returncode, "unknown split 'bogus'", "dirichlet")


@pytest.mark.multirank
def test_split_runs_on_two_ranks(tmp_path):
    """skew2 and dirichlet shares with R = local on 2 ranks, one short epoch each: the
    metrics say what ran (split, alpha, R, every rank's labels, as D.shard gives them),
    ranks end identical; --R on a sign preset is refused by the preset lock."""
    plan = [{"method": "mvsm-v1", "split": "skew2"},
            {"method": "mvsm-v2", "split": "dirichlet", "alpha": 0.5, "R": "local"}]
    job = launch(ROOT / "tests" / "workers" / "train_worker.py", 2, launcher="mpirun",
                 timeout=180, env={"OMP_NUM_THREADS": "1"},
                 args=["--plan", plan_file(tmp_path, plan), "--epochs", 1, "--batch-size", 32,
                       "--train-samples", 600, "--no-full-grad", "--out-dir", tmp_path / "runs"])
    assert_ranks_identical(job, len(plan))
    runs = read_runs(tmp_path / "runs")
    y = D.load_digits().y_train[:600]
    for spec in plan:
        cfg = next(r[0] for r in runs.values() if r[0]["split"] == spec["split"])
        assert cfg["R"] == spec.get("R") and cfg["alpha"] == spec.get("alpha")
        shares = [D.shard(y, r, 2, split=spec["split"], alpha=spec.get("alpha", 0.1), seed=0)
                  for r in range(2)]
        want = [np.bincount(y[s], minlength=10).tolist() for s in shares]
        assert cfg["share_labels"] == want
        if spec["split"] == "skew2":  # two shards of a quarter of the sorted labels each
            assert all(sum(1 for k in w if k) <= 7 for w in want), want
    p = run_cli("--method", "signsgd-mv", "--R", "local", "--epochs", 1)
    assert_clean_failure(p.stderr, p.returncode, "signsgd-mv fixes R")
