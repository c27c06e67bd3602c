"""Issue 4: the training wrapper (MVSM and the majority-vote family) on real ranks.

One job per (launcher, n) runs every multi-rank check (tests/workers/optim_train.py);
the tests below compare what each rank saved with a single-process oracle of n ranks
(tests/optim_oracle.py: plain NumPy + torch autograd, sharing only the counter-based
random function with the code under test), bit for bit."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import optim_oracle as O
from conftest import requires_horovod
from harness import ROOT, WORKERS, _bin, launch

# the worker's settings, restated (a change there must be made here too)
STEPS, RESUME_AT, BUCKET, SEED, LR = 20, 7, 30, 5, 0.05
METHODS = ["signsgd-mv", "signum-mv", "sto-signsgd", "mv-sto-signsgd-sim", "mvsm-v1", "mvsm-v2"]
SCHEDULES = ["allgather", "sharded", "allreduce"]
DT = {"w1": "fp16", "w2": "bf16"}
GROUPS = [(["w1", "b1"], 0.02, 0.1), (["w2", "b2", "unused"], LR, 0.0)]
NAMES = [name for name, _ in O.SPECS]
SLICES = {}
_at = 0
for _name, _shape in O.SPECS:
    SLICES[_name] = slice(_at, _at + int(np.prod(_shape)))
    _at += int(np.prod(_shape))

CONFIGS = [("mpirun", 1), ("mpirun", 3), ("mpirun", 4),
           pytest.param(("horovodrun", 3), marks=requires_horovod)]
JOB_TIMEOUT = 600  # generous: a loaded CI machine; a hang still fails
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only cost


@functools.lru_cache(maxsize=None)
def oracle(method, n, dtypes=False, grouped=False, hetero=True, byzantine_rank=None):
    traj, momenta = O.simulate(method, n, STEPS, lr=LR, seed=SEED,
                               dtypes=DT if dtypes else None, groups=GROUPS if grouped else None,
                               hetero=hetero, byzantine_rank=byzantine_rank)
    return traj, momenta


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-n{c[1]}")
def job(request, tmp_path_factory):
    launcher, n = request.param
    transport = "horovod" if launcher == "horovodrun" else "mpi"
    ckpt = tmp_path_factory.mktemp("ckpt")
    j = launch("optim_train.py", n, launcher=launcher, args=[transport, ckpt], timeout=JOB_TIMEOUT,
               env=ONE_THREAD)
    j.launcher, j.n, j.transport = launcher, n, transport
    return j


def assert_bits_equal(got, want, what):
    """Bit-for-bit equality of fp32 trajectories (steps x coordinates); names the first
    step and coordinate that differ."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = got.view(np.uint32) != want.view(np.uint32)
    if diff.any():
        step, coord = np.argwhere(diff)[0]
        name = next(k for k, s in SLICES.items() if s.start <= coord < s.stop)
        raise AssertionError(f"{what}: first difference at step {step}, {name}"
                             f"[{coord - SLICES[name].start}]: {got[step, coord]!r} != {want[step, coord]!r}"
                             f" ({int(diff.sum())} coordinates differ in all)")


def momentum_names(job, tag):
    return [k for k in NAMES if f"{tag}-mom-{k}" in job[0]]


def assert_momenta_close(job, tag, momenta):
    """Each rank's final momentum equals the oracle's (up to float rounding: the oracle
    rounds (1 - beta) v + beta g its own way, not as torch.lerp_ does)."""
    for r in range(job.n):
        for name in NAMES:
            key = f"{tag}-mom-{name}"
            if name not in momenta[r]:
                assert key not in job[r], f"{tag}: rank {r} keeps a momentum for {name}, the method has none"
                continue
            assert str(job[r][f"{tag}-momdtype-{name}"]) == "torch.float32", f"{tag}: momentum of {name} not fp32"
            np.testing.assert_allclose(job[r][key].reshape(-1), momenta[r][name], rtol=2e-5, atol=1e-7,
                                       err_msg=f"{tag}: rank {r} momentum of {name}")


# -- the family against the oracle ------------------------------------------------------

def test_transport_and_no_horovod_under_mpirun(job):
    for r in range(job.n):
        assert int(job[r]["size"]) == job.n and int(job[r]["rank"]) == r
        assert str(job[r]["transport"]) == job.transport, "default transport: Horovod iff initialised"
        assert bool(job[r]["horovod-imported"]) == (job.transport == "horovod"), \
            "Horovod was imported under plain mpirun" if job.transport == "mpi" else "?"


@pytest.mark.parametrize("method", METHODS)
def test_method_equals_oracle_bit_for_bit(job, method):
    """20 steps of each family member, each schedule, heterogeneous data (each rank its own
    batches), buckets of 30 coordinates (4 buckets, one with two tensors): every rank's
    parameters after every step equal the oracle's bit for bit."""
    want, momenta = oracle(method, job.n)
    for schedule in SCHEDULES:
        tag = f"{method}-{schedule}"
        for r in range(job.n):
            assert_bits_equal(job[r][f"{tag}-traj"], want, f"{tag} rank {r} of {job.n}")
        assert_momenta_close(job, tag, momenta)
    # the run really moved, the tensor without a gradient did not
    assert not np.array_equal(want[-1], O.flat(O.init_params(1)))
    assert np.array_equal(want[:, SLICES["unused"]], np.tile(O.flat(O.init_params(1))[SLICES["unused"]], (STEPS, 1)))


def test_heterogeneous_data_matters(job):
    """The oracle comparison above distinguishes per-rank data from shared data (so it
    checks that each rank's own gradient, not rank 0's, enters the vote)."""
    if job.n == 1:
        pytest.skip("one rank: nothing is heterogeneous")
    for method in ("signsgd-mv", "mvsm-v1"):
        assert not np.array_equal(oracle(method, job.n)[0], oracle(method, job.n, hetero=False)[0])


def test_all_ranks_bit_identical(job):
    keys = [k for k in job[0] if k.endswith("-traj")] + ["nan-recovered", "bc-after"]
    assert any(k.startswith("mvsm-v1") for k in keys) and any(k.startswith("mvsm-v2") for k in keys)
    for key in keys:
        for r in range(1, job.n):
            assert np.array_equal(job[r][key].view(np.uint32), job[0][key].view(np.uint32)), \
                f"{key}: rank {r} differs from rank 0"


def test_stats(job):
    """opt.stats after a step: non-negative times; bytes from the ledger.  The allgather
    of mvsm-v1 sends (n-1) x (5 + 4 + 1) packed bytes per step for its three buckets
    (35, 7 + 21 and 3 coordinates), plus control messages (agreement, shared R, lockstep: < 1 KB)."""
    for r in range(job.n):
        compress, comm, vote, update, sent, received = job[r]["mvsm-v1-allgather-stats"]
        assert min(compress, comm, vote, update) >= 0 and compress + vote + update > 0
        if job.n > 1:
            assert 10 * (job.n - 1) <= sent < 10 * (job.n - 1) + 1000 and received >= 10 * (job.n - 1)
        else:
            assert sent == received == 0


# -- dtypes, groups, checkpoints -------------------------------------------------------

@pytest.mark.parametrize("method", ["signum-mv", "mvsm-v2"])
def test_half_precision_and_param_groups(job, method):
    """w1 fp16, w2 bf16, biases fp32; group 1 (w1, b1) lr 0.02 with decoupled weight
    decay 0.1, group 2 lr 0.05 without; 'unused' never has a gradient."""
    want, momenta = oracle(method, job.n, dtypes=True, grouped=True)
    for r in range(job.n):
        got = job[r][f"dt-{method}-traj"]
        assert_bits_equal(got, want, f"dt-{method} rank {r}")
        w1 = got[:, SLICES["w1"]]
        assert np.array_equal(w1, w1.astype(np.float16).astype(np.float32)), "w1 is not fp16"
    assert_momenta_close(job, f"dt-{method}", momenta)
    # the groups' settings made a difference (the oracle with one group differs)
    assert not np.array_equal(want, oracle(method, job.n, dtypes=True)[0])
    init = O.flat(O.init_params(1, DT))[SLICES["unused"]]
    assert np.array_equal(want[:, SLICES["unused"]], np.tile(init, (STEPS, 1)))


@pytest.mark.parametrize("method,uninterrupted,dtypes,grouped", [
    ("mvsm-v2", "dt-mvsm-v2", True, True),
    ("signum-mv", "signum-mv-sharded", False, False),
    ("mvsm-v1", None, True, True)])
def test_checkpoint_resume_bit_for_bit(job, method, uninterrupted, dtypes, grouped):
    """Saved at step 7 (torch.save of opt.state_dict() and model.state_dict(), one file
    per rank), loaded with weights_only=True into fresh objects built from other values,
    continued to step 20: the run that never stopped, bit for bit (parameters and every
    rank's momentum)."""
    tag = f"ck-{method}"
    want = oracle(method, job.n, dtypes=dtypes, grouped=grouped)[0]
    for r in range(job.n):
        assert_bits_equal(job[r][f"{tag}-traj"], want, f"{tag} rank {r}")
        if uninterrupted:
            assert_bits_equal(job[r][f"{tag}-traj"], job[r][f"{uninterrupted}-traj"], f"{tag} vs {uninterrupted}")
            for name in momentum_names(job, uninterrupted):
                a, b = job[r][f"{tag}-mom-{name}"], job[r][f"{uninterrupted}-mom-{name}"]
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), (
                    f"{tag} rank {r}: momentum of {name} after resume differs from the uninterrupted "
                    f"run (max |diff| {np.abs(a - b).max():.3g})")
            assert momentum_names(job, tag) == momentum_names(job, uninterrupted)


# -- lockstep, broadcast, byzantine ---------------------------------------------------------

def test_broadcast_state(job):
    before0 = job[0]["bc-before"]
    for r in range(job.n):
        assert np.array_equal(job[r]["bc-after"], before0), f"rank {r} does not hold rank 0's parameters"
        assert np.array_equal(job[r]["bc-mom-after"], job[0]["bc-mom-before"]), f"rank {r}: momentum not rank 0's"
        if r:
            assert not np.array_equal(job[r]["bc-before"], before0), "ranks started identical: the test proves nothing"
            assert not np.array_equal(job[r]["bc-mom-before"], job[0]["bc-mom-before"])


def test_lockstep_check_names_the_step(job):
    """The last rank's w2[0, 0] moves one ulp after step 3; with lockstep_every=3 the
    check after step index 5 raises on every rank (and the every-step checks of the
    oracle runs never raised)."""
    if job.n == 1:
        pytest.skip("one rank cannot diverge")
    for r in range(job.n):
        msg = str(job[r]["ls-error"])
        assert msg.startswith("LockstepError") and "step 5" in msg, (r, msg)
        assert int(job[r]["ls-at"]) == 5


def test_byzantine_rank_is_tolerated(job):
    """Rank 0 sends the opposite of its signs (signSGD-MV, same data distribution on all
    ranks): the run equals the oracle with that rank inverted, all ranks stay identical,
    and the evaluation loss still goes down."""
    if job.n < 3:
        pytest.skip("a majority needs at least 3 ranks")
    want = oracle("signsgd-mv", job.n, hetero=False, byzantine_rank=0)[0]
    honest = oracle("signsgd-mv", job.n, hetero=False)[0]
    assert not np.array_equal(want, honest), "the Byzantine rank changed nothing: the test proves nothing"
    for r in range(job.n):
        assert_bits_equal(job[r]["byz-traj"], want, f"byzantine rank {r}")
        start, end = job[r]["byz-eval"]
        assert end < start - 0.05, f"loss {start:.3f} -> {end:.3f} with one Byzantine rank"


# -- errors on real ranks ------------------------------------------------------------

def test_nan_gradient_fails_everywhere_and_updates_nothing(job):
    bad = job.n - 1
    for r in range(job.n):
        msg = str(job[r]["nan-error"])
        assert msg.startswith("RemoteRankError"), (r, msg)
        if r == bad:
            assert "non-finite" in msg and "w2" in msg and "step 3" in msg, (r, msg)
            assert "w1" not in msg and "b2" not in msg
        else:
            assert f"rank {bad} failed" in msg, (r, msg)
        assert bool(job[r]["nan-params-unchanged"]), f"rank {r}: parameters changed by the failed step"
        assert bool(job[r]["nan-moms-unchanged"]), f"rank {r}: momentum changed by the failed step"
        assert int(job[r]["nan-step-counter"]) == 3
    # the job goes on: the retried step 3 is the oracle's 4th step of mvsm-v1
    want = oracle("mvsm-v1", job.n)[0][3]
    for r in range(job.n):
        assert_bits_equal(job[r]["nan-recovered"][None], want[None], f"after the NaN, rank {r}")


@pytest.mark.parametrize("case", ["numel", "transposed", "count", "dtype"])
def test_ranks_with_different_parameters_fail_clearly(job, case):
    if job.n == 1:
        pytest.skip("one rank")
    for r in range(job.n):
        for key in (f"shape-{case}", f"shape-bc-{case}"):
            msg = str(job[r][key])
            assert msg.startswith("RankMismatchError") and "disagree" in msg, (r, key, msg)
        assert bool(job[r][f"shape-{case}-unchanged"]), f"rank {r}: parameters changed"


DIES = [("mpirun", "mpi"), pytest.param("horovodrun", "horovod", marks=requires_horovod)]


@pytest.mark.parametrize("launcher,transport", DIES)
def test_dead_rank_ends_the_job_within_seconds(tmp_path, launcher, transport):
    """Rank 1 is SIGKILLed at step 5 while the others wait in the vote: the launcher
    ends the whole job and says why; the seconds from the kill to the end are counted
    (not the start-up)."""
    stamp = tmp_path / "killed_at"
    t0 = time.time()
    job = launch("optim_dies.py", 3, launcher=launcher, args=[transport, "kill", stamp],
                 timeout=JOB_TIMEOUT, expect_failure=True, env=ONE_THREAD)
    ended = time.time()
    assert stamp.exists(), f"rank 1 never reached the kill:\n{job.output}"
    killed = float(stamp.read_text())
    assert t0 < killed < ended
    assert ended - killed < 20, f"the job took {ended - killed:.1f}s to end after rank 1 died"
    assert "BAD TERMINATION" in job.output and "Killed (signal 9)" in job.output, job.output
    assert "finished all steps" not in job.output


def test_uncaught_error_aborts_without_mpi4py_runner(tmp_path):
    """A user script run as `mpirun -np 3 python train.py` (no `-m mpi4py`): an exception
    on rank 1 mid-training must still end every rank (signcomm's MPI_Abort hook)."""
    stamp = tmp_path / "raised_at"
    cmd = [_bin("mpirun"), "-np", "3", sys.executable, str(WORKERS / "optim_dies.py"), "mpi", "raise", str(stamp)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", PYTHONUNBUFFERED="1", **ONE_THREAD)
    env["PATH"] = f"{_bin('mpirun').rsplit('/', 1)[0]}:{env.get('PATH', '')}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=env, cwd=ROOT)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ended - float(stamp.read_text()) < 20, out
    assert "rank 1 gives up at step 5" in out and "aborting the MPI job" in out, out
    assert "finished all steps" not in out


# -- arguments (one process) -------------------------------------------------------------

def _params():
    return [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr must be a positive"), (dict(lr=-1e-3), "lr must be a positive"),
    (dict(lr=float("nan")), "lr must be a positive"), (dict(lr=float("inf")), "lr must be a positive"),
    (dict(beta=0.0), r"beta must be in \(0, 1\]"), (dict(beta=1.5), r"beta must be in \(0, 1\]"),
    (dict(beta=-0.1), r"beta must be in \(0, 1\]"), (dict(beta=float("nan")), r"beta must be in \(0, 1\]"),
    (dict(schedule="ring"), "schedule must be one of"), (dict(transport="nccl"), "transport must be"),
    (dict(variant="v3"), "variant must be one of"), (dict(R=0.0), "positive"), (dict(R=-1.0), "positive"),
    (dict(R="median"), "R must be"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_arguments(kwargs, match):
    from signcomm import MVSM
    kwargs = {"lr": 0.01, "transport": "mpi", **kwargs}
    with pytest.raises(ValueError, match=match):
        MVSM(_params(), **kwargs)


@pytest.mark.parametrize("group,match", [
    (dict(lr=0.0), "lr must be a positive"), (dict(lr=-0.5), "lr must be a positive"),
    (dict(beta=0.0), r"beta must be in \(0, 1\]"), (dict(beta=2.0), r"beta must be in \(0, 1\]"),
    (dict(weight_decay=-1.0), "weight_decay")])
def test_bad_param_group_arguments(group, match):
    """A param group's own lr / beta / weight decay are checked like the defaults."""
    import signcomm
    p, q = _params()
    with pytest.raises(ValueError, match=match):
        signcomm.MVSM([{"params": [p]}, {"params": [q], **group}], lr=0.01, transport="mpi")
    opt = signcomm.MVSM([p], lr=0.01, transport="mpi")
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [q], **group})
    with pytest.raises(ValueError, match=match):
        signcomm.Signum([{"params": [p]}, {"params": [q], **group}], lr=0.01)


def test_unknown_method_name():
    import signcomm
    with pytest.raises(ValueError, match="unknown optimizer 'mvsm-v3'.*signsgd-mv.*mvsm-v2"):
        signcomm.create_optimizer("mvsm-v3", _params(), lr=0.01)
    with pytest.raises(ValueError, match="fixes"):
        signcomm.create_optimizer("signsgd-mv", _params(), lr=0.01, beta=0.5, transport="mpi")
    for name in signcomm.NAMES:  # every listed name builds
        opt = signcomm.create_optimizer(name.upper().replace("-", "_"), _params(), lr=0.01,
                                        **({} if name in ("signum", "signsgd") else {"transport": "mpi"}))
        assert isinstance(opt, torch.optim.Optimizer)


@requires_horovod
def test_horovod_transport_without_hvd_init_fails_clearly():
    """transport='horovod' in a process that never called hvd.init() (here: an MPI
    singleton): a clear error that says what to do, not a hang or a Horovod crash."""
    code = ("import torch, signcomm\n"
            "from signcomm.comm import TransportError\n"
            "try:\n    signcomm.MVSM([torch.nn.Parameter(torch.zeros(2))], lr=0.1, transport='horovod')\n"
            "except TransportError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=JOB_TIMEOUT,
                          cwd=ROOT)
    assert "ERR Horovod is not initialised" in proc.stdout and "hvd.init()" in proc.stdout, proc.stdout + proc.stderr


def test_checkpoint_on_other_number_of_ranks_warns(tmp_path):
    """A checkpoint written by 4 ranks loaded on 1: the step counter and this file's
    momentum are taken, with a warning that the run is no longer bit-identical; the same
    for another rank's file at the same size; silent for the rank's own file."""
    import signcomm
    p = torch.nn.Parameter(torch.ones(4))
    opt = signcomm.create_optimizer("mvsm-v1", [p], lr=0.1, transport="mpi")
    p.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt.step()
    sd = opt.state_dict()
    sd["signcomm"]["size"], sd["signcomm"]["rank"] = 4, 2
    torch.save(sd, tmp_path / "opt.pt")
    q = torch.nn.Parameter(torch.ones(4))
    fresh = signcomm.create_optimizer("mvsm-v1", [q], lr=0.1, transport="mpi")
    with pytest.warns(UserWarning, match="written by 4 ranks, resuming on 1"):
        fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.state_dict()["signcomm"]["step"] == 1
    assert torch.equal(fresh.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    sd["signcomm"]["size"], sd["signcomm"]["rank"] = 1, 3  # same size, another rank's file
    with pytest.warns(UserWarning, match="rank 0 loaded rank 3's checkpoint"):
        signcomm.create_optimizer("mvsm-v1", [q], lr=0.1, transport="mpi").load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own file: silent
        signcomm.create_optimizer("mvsm-v1", [q], lr=0.1, transport="mpi").load_state_dict(opt.state_dict())


def _momentum_run(edit, steps=3):
    """mvsm-v1 on one rank, two small parameters in one bucket; ``edit(opt, params)``
    after the first step.  Returns (momenta, parameters) after ``steps`` steps."""
    import signcomm
    gen = torch.Generator().manual_seed(0)
    qs = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5, 3), (4,))]
    opt = signcomm.create_optimizer("mvsm-v1", qs, lr=0.1, transport="mpi")
    for t in range(steps):
        for q in qs:
            q.grad = torch.randn(q.shape, generator=gen)
        opt.step()
        if t == 0:
            edit(opt, qs)
    return ([opt.state[q]["momentum_buffer"].clone() for q in qs], [q.detach().clone() for q in qs])


def test_momentum_state_set_from_outside_is_used():
    """The momentum lives in flat per-bucket buffers (``state[p]["momentum_buffer"]`` are
    views of them): a buffer replaced by assignment and one changed in place both feed
    the next step, the same way."""
    def assign(opt, qs):
        for q in qs:
            opt.state[q]["momentum_buffer"] = torch.full_like(q, 7.0)

    def in_place(opt, qs):
        for q in qs:
            opt.state[q]["momentum_buffer"].fill_(7.0)

    m_assign, x_assign = _momentum_run(assign)
    m_inplace, x_inplace = _momentum_run(in_place)
    m_none, _ = _momentum_run(lambda opt, qs: None)
    for a, b in zip(m_assign + x_assign, m_inplace + x_inplace):
        assert torch.equal(a, b)
    assert not torch.equal(m_assign[0], m_none[0])
    m1, _ = _momentum_run(assign, steps=2)  # one step after the edit: lerp(7, g, 0.5)
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(s, generator=gen) for _ in range(3) for s in ((5, 3), (4,))]
    for m, g in zip(m1, draws[4:]):
        assert torch.equal(m, torch.lerp(torch.full_like(g, 7.0), g, 0.5))


def test_nan_gradient_changes_no_momentum_or_parameter_one_rank():
    """A step with a NaN gradient raises naming the parameter; parameters and momentum
    (the state tensors and their values) are unchanged, and the next good step goes on."""
    import signcomm
    gen = torch.Generator().manual_seed(1)
    qs = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 2), (3,))]
    opt = signcomm.create_optimizer("mvsm-v1", qs, lr=0.1, transport="mpi")
    for _ in range(2):
        for q in qs:
            q.grad = torch.randn(q.shape, generator=gen)
        opt.step()
    before = [(q.detach().clone(), opt.state[q]["momentum_buffer"].clone()) for q in qs]
    objs = [opt.state[q]["momentum_buffer"] for q in qs]
    qs[1].grad = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(Exception, match="non-finite gradient"):
        opt.step()
    for q, (x, m), obj in zip(qs, before, objs):
        assert torch.equal(q.detach(), x) and torch.equal(opt.state[q]["momentum_buffer"], m)
        assert opt.state[q]["momentum_buffer"] is obj
    assert opt.state_dict()["signcomm"]["step"] == 2
    qs[1].grad = torch.tensor([1.0, -1.0, 2.0])
    opt.step()
    assert torch.equal(opt.state[qs[1]]["momentum_buffer"], torch.lerp(before[1][1], qs[1].grad, 0.5))


# -- single node ------------------------------------------------------------------------

@pytest.mark.parametrize("cls,beta", [("Signum", 0.1), ("Signum", 0.5), ("SignSGD", 1.0)])
def test_single_node_with_closure(cls, beta):
    """Algorithm 1 (and eq. 3), with a closure, against NumPy: v_1 = g_1,
    v_t = (1 - beta) v + beta g, x -= lr sign(v) (sign(0) = 0), decoupled weight decay."""
    import signcomm
    params = O.init_params(1)
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
    kw = {} if cls == "SignSGD" else {"beta": beta}
    opt = getattr(signcomm, cls)(model.parameters(), lr=0.03, weight_decay=0.2, **kw)
    x = {k: v.numpy().copy() for k, v in params.items()}
    m = {}
    for step in range(6):
        xb, yb = O.batch(0, step)

        def closure():
            opt.zero_grad()
            loss = O.loss_fn(model, xb, yb)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert loss is not None and np.isfinite(loss.item())
        grads = O.gradients({k: torch.from_numpy(v) for k, v in x.items()}, 0, step)
        for k, g in grads.items():
            if g is None:
                continue
            g = g.numpy()
            m[k] = g.copy() if k not in m else m[k] * np.float32(1 - beta) + g * np.float32(beta)
            x[k] = x[k] * np.float32(1 - 0.03 * 0.2) - np.float32(0.03) * np.sign(m[k])
        for k in x:
            np.testing.assert_allclose(model[k].detach().numpy(), x[k], rtol=0, atol=1e-6, err_msg=f"{cls} {k} step {step}")
    assert np.array_equal(model["unused"].detach().numpy(), params["unused"].numpy())


# -- convergence sanity -------------------------------------------------------------------

DIGITS_RUNS = ["signsgd-mv:0.005", "mvsm-v1:0.005:0.1", "mvsm-v2:0.005:0.1"]


def test_mvsm_beats_signsgd_mv_on_digits():
    """sklearn digits, 64-32-10 MLP, 4 ranks with their own random shard, 4 examples per
    rank per step, 400 steps, settings from the paper's grid (lr 5e-3 / 2.5e-3, beta 0.1):
    MVSM's local momentum + unbiased S_R vote ends at a lower full-training-set loss
    (mean of the last 5 evaluations, every 10 steps) than signSGD-MV, whose sign of a
    4-example gradient stalls at a noise floor.  Seed 1; seeds 1-4 gave v1 0.148-0.157,
    v2 0.185-0.195, signSGD-MV 0.219-0.239 at lr 5e-3 (0.239-0.264 at its other grid lr
    2.5e-3, so the lr is not what decides it)."""
    job = launch("optim_digits.py", 4, args=[400, 4, "iid", 1, *DIGITS_RUNS], timeout=JOB_TIMEOUT,
                 env=ONE_THREAD)
    final = {k: float(job[0][k][-5:].mean()) for k in DIGITS_RUNS}
    for r in range(1, 4):  # the same model on every rank
        for k in DIGITS_RUNS:
            assert np.array_equal(job[r][k], job[0][k])
    start = float(job[0][DIGITS_RUNS[0]][0])
    best_signsgd = final["signsgd-mv:0.005"]
    assert best_signsgd < 0.5 * start, f"signSGD-MV did not train at all: {final}"
    assert final["mvsm-v1:0.005:0.1"] < 0.85 * best_signsgd, final
    assert final["mvsm-v2:0.005:0.1"] < best_signsgd, final
