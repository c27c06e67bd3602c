"""The overlap option changes timing, never results: overlapped and synchronous MVSM
end bit-identical, on every rank, over both transports; a NaN mid-overlap still updates
nothing anywhere."""
import numpy as np
import pytest

from conftest import requires_horovod
from harness import launch


@pytest.mark.parametrize("launcher,transport,n", [
    ("mpirun", "mpi", 3), pytest.param("horovodrun", "horovod", 2, marks=requires_horovod)])
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
