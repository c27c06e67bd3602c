"""The harness and the install: real mpirun and horovodrun jobs, compared with an oracle."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_horovod
from harness import JobFailed, launch
from signcomm import kernels as K


def oracle_vote(xs, key):
    """Plain vote: count positive signs, compare with n/2, coin on ties."""
    n, d = len(xs), xs[0].size
    c = sum((x > 0).astype(int) for x in xs)
    coins = K.tie_coin_bits(key, np.arange(d, dtype=np.uint64))
    return K.pack_bits(np.where(2 * c == n, coins, 2 * c > n))


@pytest.mark.parametrize("launcher,n", [("mpirun", 4), ("python", 1),
                                        pytest.param("horovodrun", 2, marks=requires_horovod)])
def test_vote_job_matches_oracle(launcher, n):
    args = [1001] + (["--horovod"] if launcher == "horovodrun" else [])
    job = launch("hello_vote.py", n, launcher=launcher, args=args, timeout=120)
    xs = [job[r]["x"] for r in range(n)]
    want = oracle_vote(xs, K.key64(0, K.stream_id(K.Purpose.TIE_COIN), 0))
    for r in range(n):
        np.testing.assert_array_equal(job[r]["vote"], want)
    if launcher == "horovodrun":
        assert all(bool(job[r]["mpi_enabled"]) for r in range(n)), "Horovod fell back to Gloo"
        assert sorted(int(job[r]["hvd_rank"]) for r in range(n)) == list(range(n))


def test_failing_rank_fails_the_job(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("from mpi4py import MPI\nimport sys\n"
                      "if MPI.COMM_WORLD.Get_rank() == 1: sys.exit('rank 1 exploded')\n"
                      "MPI.COMM_WORLD.Barrier()\n")
    with pytest.raises(JobFailed, match="(?s)exited.*rank 1 exploded"):
        launch(script, 2, timeout=60)


def test_hang_is_killed(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("from mpi4py import MPI\nimport time\n"
                      "if MPI.COMM_WORLD.Get_rank() == 0: time.sleep(600)\n"
                      "MPI.COMM_WORLD.Barrier()\n")
    with pytest.raises(JobFailed, match="hung"):
        launch(script, 2, timeout=5)


def test_missing_result_is_reported(tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text("print('no result from me')\n")
    with pytest.raises(JobFailed, match="left no result"):
        launch(script, 2, timeout=60)


@requires_horovod
def test_horovod_extension_is_relocatable():
    """The cached Horovod wheel is shared by every clone, so its extension must find
    libmpi and torch relative to itself, never in the venv that happened to build it."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not installed")
    ext = Path(importlib.util.find_spec("horovod").origin).parent / "torch"
    libs = sorted(ext.glob("mpi_lib*.so"))
    assert libs, f"no Horovod torch extension in {ext}"
    for lib in libs:
        dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
        paths = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines()
                 if "RUNPATH" in line or "RPATH" in line]
        assert paths, f"{lib.name} has no RUNPATH: libmpi would only be found system-wide"
        absolute = [p for p in ":".join(paths).split(":") if p.startswith("/")]
        assert not absolute, f"{lib.name} has absolute RUNPATH entries {absolute} (venv {sys.prefix})"
