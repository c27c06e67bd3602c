"""The overlap option changes timing, never results: overlapped and synchronous MVSM
end bit-identical, on every rank, over MPI, Horovod and torch.distributed (gloo, under
torchrun); a NaN mid-overlap still updates
nothing anywhere; ranks whose gradients cover different parameters get an error on every
rank and train on afterwards, ranks that all lack the same gradients fall back to the
synchronous step."""
import numpy as np
import pytest

from conftest import requires_horovod
from harness import launch


@pytest.mark.parametrize("launcher,transport,n", [
    ("mpirun", "mpi", 3), pytest.param("horovodrun", "horovod", 2, marks=requires_horovod),
    ("torchrun", "torch", 2)])
def test_overlap_equals_sync(launcher, transport, n):
    job = launch("optim_overlap.py", n, launcher=launcher, args=[transport], timeout=180)
    for variant in ("v1", "v2"):
        for r in range(n):
            sync, over = job[r][f"{variant}-0-params"], job[r][f"{variant}-1-params"]
            np.testing.assert_array_equal(over, sync, err_msg=f"{variant} rank {r}")
            np.testing.assert_array_equal(sync, job[0][f"{variant}-0-params"])
            assert int(job[r][f"{variant}-1-buckets"]) > 1, "the test needs several buckets"
            for mode in ("0", "1"):
                assert bool(job[r][f"{variant}-{mode}-unchanged"]), f"{variant} overlap={mode}: params moved"
                err = str(job[r][f"{variant}-{mode}-err"])
                assert "Error" in err, err
                if r == 0:
                    assert "non-finite gradient" in err and "param_groups[0]['params'][2]" in err, err
    for r in range(n):
        hooks = list(job[r]["hook-counts"])
        assert hooks == [4, 0, 4, 0], f"rank {r}: hooks on the model while alive / after drop: {hooks}"
        np.testing.assert_array_equal(job[r]["after-drop-params"], job[0]["after-drop-params"])
    for r in range(n):
        errs = str(job[r]["sets-odd-1-errs"]).split("\n")
        assert errs[0] == errs[2] == errs[3] == "no error", errs
        assert errs[1].startswith("RankMismatchError") and "unchanged=True" in errs[1], errs[1]
        assert "every rank must have gradients for the same parameters" in errs[1], errs[1]
        np.testing.assert_array_equal(job[r]["sets-odd-1-params"], job[0]["sets-odd-1-params"])
        assert str(job[r]["sets-all-1-errs"]) == "\n".join(["no error"] * 4)
        np.testing.assert_array_equal(job[r]["sets-all-1-params"], job[r]["sets-all-0-params"])
