"""The bucket engine and its backends: the torch backend gives the numba backend's
trajectories bit for bit through the whole optimizer (every preset, schedule, R policy,
tie rule, weight decay, fp16/bf16), on real ranks; non-blocking collectives on several
channels; bad devices and mismatched backends fail clearly on every rank."""
import numpy as np
import pytest
import torch

import signcomm
from conftest import requires_horovod
from harness import launch
from signcomm.backends import BackendError, get_backend
from signcomm.comm import RankMismatchError, RemoteRankError

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
NCASES = 23


@pytest.fixture(scope="module", params=[("mpirun", 1), ("mpirun", 3), ("mpirun", 4),
                                        pytest.param(("horovodrun", 2), marks=requires_horovod)],
                ids=lambda c: f"{c[0]}-n{c[1]}")
def job(request):
    launcher, n = request.param
    j = launch("engine_backends.py", n, launcher=launcher,
               args=["horovod" if launcher == "horovodrun" else "mpi"], timeout=240, env=ONE_THREAD)
    j.n = n
    return j


def test_torch_backend_equals_numba_backend_bit_for_bit(job):
    for case in [*range(NCASES), "dt"]:
        for r in range(job.n):
            a, b = job[r][f"traj-{case}-numba"], job[r][f"traj-{case}-torch"]
            assert a.shape[0] == 8
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"case {case}, rank {r}"
            assert np.array_equal(a, job[0][f"traj-{case}-numba"]), f"case {case}: ranks differ"
        assert not np.array_equal(a[0], a[-1]), f"case {case}: nothing moved"


def test_non_blocking_collectives_on_channels(job):
    n = job.n
    for r in range(n):
        np.testing.assert_array_equal(job[r]["nb-allreduce"], np.arange(4) * n * (n + 1) // 2)
        np.testing.assert_array_equal(job[r]["nb-allgather"], np.repeat(np.arange(n), 5).reshape(n, 5))
        want = np.repeat((r + 10 * np.arange(n))[:, None], 3, 1)  # row j came from rank j
        np.testing.assert_array_equal(job[r]["nb-alltoall"], want)
        assert str(job[r]["nb-torch-type"]) == "Tensor"
        np.testing.assert_array_equal(job[r]["nb-torch"], np.repeat(np.arange(n), 3).reshape(n, 3))
        assert int(job[r]["nb-ledger-calls"]) >= 4


def test_ranks_with_different_backends_fail_on_every_rank(job):
    if job.n == 1:
        pytest.skip("one rank")
    for r in range(job.n):
        err = str(job[r]["mm-err"])
        assert "RankMismatchError" in err and "disagree" in err, err
        assert bool(job[r]["mm-unchanged"])


# -- single process ----------------------------------------------------------------------
def test_backend_choice_and_errors():
    assert get_backend("auto", torch.device("cpu")).name == "numba"
    assert get_backend("auto", "cuda").name == "torch"
    assert get_backend("torch", "cpu").name == "torch"
    with pytest.raises(BackendError, match="cannot run on cuda"):
        get_backend("numba", "cuda")
    with pytest.raises(BackendError, match="not built yet"):
        get_backend("cupy", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("jax")
    with pytest.raises(ValueError, match="backend must be one of"):
        signcomm.MVSM([torch.nn.Parameter(torch.ones(3))], lr=0.1, transport="mpi", backend="jax")


def test_parameter_on_a_device_the_backend_cannot_run_fails_before_any_vote():
    w = torch.nn.Parameter(torch.ones(4, device="meta"))
    opt = signcomm.MVSM([w], lr=0.1, transport="mpi", backend="numba")
    w.grad = torch.ones(4, device="meta")
    with pytest.raises(RemoteRankError, match="cannot run on meta"):
        opt.step()
    assert opt.engine.step == 0


def test_mixed_devices_in_one_optimizer_fail_clearly():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = signcomm.MVSM([a, b], lr=0.1, transport="mpi")
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(RemoteRankError, match="BackendError: parameters on several devices"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3))


def test_engine_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    opt = signcomm.MVSM([w], lr=0.1, transport="mpi", beta=0.3)
    for _ in range(3):
        w.grad = torch.randn(50)
        opt.step()
    sd = opt.engine.state_dict()
    assert sd["step"] == 3 and torch.equal(sd["momentum"][0], opt.state[w]["momentum_buffer"])
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = signcomm.MVSM([w2], lr=0.1, transport="mpi", beta=0.3)
    w2.grad = torch.zeros(50)
    opt2.engine.layout_for([w2])
    opt2.engine.load_state_dict(sd)
    assert opt2.engine.step == 3
    assert torch.equal(opt2.engine.layout.momentum(0, 0), sd["momentum"][0])
