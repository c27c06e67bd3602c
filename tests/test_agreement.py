"""Complete agreement: every setting that changes the result on any rank (lr, weight decay
and beta per parameter, momentum init, bucket layout, contribution, R policy, backend,
schedule, tie rule, seed) is checked every step; a difference raises RankMismatchError
on every rank naming the setting, and nothing moves.  Plus the argument checks that
close validation gaps at construction."""
import pytest
import torch

import signcomm
from harness import launch

CASES = ["lr", "weight_decay", "beta", "momentum_init", "bucket_elements", "contribution",
         "R", "backend", "schedule", "tie", "seed"]


ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", params=["mpirun", "torch"])
def job(request):
    """mismatch.py on 2 ranks: MPI under mpirun, and torch.distributed (gloo)."""
    if request.param == "torch":
        return launch("mismatch.py", 2, launcher="torch", args=["torch"], timeout=180, env=ENV)
    return launch("mismatch.py", 2, timeout=180, env=ENV)


@pytest.mark.parametrize("case", CASES)
def test_a_setting_that_differs_is_named_on_every_rank(job, case):
    for r in range(2):
        err = str(job[r][f"err-{case}"])
        assert err.startswith("RankMismatchError"), err
        assert f"{case}=" in err or f" {case}," in err or f" {case} " in err, err
        assert bool(job[r][f"same-{case}"]), f"{case}: parameters moved on rank {r}"


@pytest.mark.parametrize("case", ["some-sr", "none-sr", "some-sign"])
def test_ranks_with_gradients_for_different_parameters_raise_on_every_rank(job, case):
    """One rank's step has no gradient for a parameter (or none at all): the control
    allreduce keeps one length (``MVSM.control_capacity`` values), so every rank gets
    RankMismatchError naming the parameters (before, the lengths differed: gloo crashed
    in the collective, MPI's outcome depended on the lengths; so did a different R
    policy or contribution under gloo)."""
    for r in range(2):
        err = str(job[r][f"err-grads-{case}"])
        assert err.startswith("RankMismatchError"), (case, err)
        assert "parameter shapes and dtypes" in err, (case, err)
        assert bool(job[r][f"same-grads-{case}"]), f"{case}: parameters moved on rank {r}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=True), "lr must be"), (dict(lr=0.1, beta=True), "beta must be"),
    (dict(lr=0.1, weight_decay=True), "weight_decay must be"),
    (dict(lr=0.5, weight_decay=3.0), r"lr \* weight_decay must be <= 1"),
    (dict(lr=0.1, bucket_elements=0), "bucket_elements must be"),
    (dict(lr=0.1, bucket_elements=2.5), "bucket_elements must be"),
])
def test_arguments_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        signcomm.MVSM([torch.nn.Parameter(torch.ones(3))], transport="mpi", **kwargs)


def test_param_group_decay_above_one_refused():
    opt = signcomm.MVSM([torch.nn.Parameter(torch.ones(3))], lr=0.1, transport="mpi")
    with pytest.raises(ValueError, match=r"lr \* weight_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 2.0,
                             "weight_decay": 1.0})


def test_momentum_overflow_is_reported_as_non_finite():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = signcomm.MVSM([p], lr=0.1, transport="mpi", beta=0.5)
    p.grad = torch.full((4,), -3e38)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.full((4,), 3e38)  # finite, but lerp(v, g) overflows fp32
    with pytest.raises(Exception, match="momentum overflowed"):
        opt.step()
    assert torch.equal(p.detach(), before)
