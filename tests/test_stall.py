"""Nothing hangs: when a rank stops stepping while the others wait in a collective, the
stall detector ends the job within SIGNCOMM_STALL_SECONDS, with a message that names the
collective and the step, and what usually causes it.  Run the way users run scripts,
``mpirun -np N python script.py`` (no ``-m mpi4py``), with the MPI transport, which has
no stall check of its own."""
import os
import subprocess
import sys
import time

import pytest

from harness import ROOT, WORKERS, _bin

LIMIT = 3


def run(case, n=3):
    cmd = [_bin("mpirun"), "-np", str(n), sys.executable, str(WORKERS / "stall.py"), case]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", PYTHONUNBUFFERED="1",
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", SIGNCOMM_STALL_SECONDS=str(LIMIT))
    env["PATH"] = f"{_bin('mpirun').rsplit('/', 1)[0]}:{env.get('PATH', '')}"
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    return proc, proc.stdout + proc.stderr, time.time() - t0


@pytest.mark.parametrize("case", ["extra-step", "sys-exit", "return"])
def test_a_rank_that_stops_stepping_ends_the_job(case):
    proc, out, seconds = run(case)
    assert proc.returncode != 0, out
    assert "gives up (SIGNCOMM_STALL_SECONDS=3)" in out, out
    assert "of step 3" in out or "of step 2" in out, out
    assert "another rank stopped stepping" in out, out
    assert seconds < 60, f"took {seconds:.0f} s\n{out}"


def test_stall_limits_from_the_environment(monkeypatch):
    from signcomm.comm.base import STALL_SECONDS, stall_limits
    monkeypatch.delenv("SIGNCOMM_STALL_SECONDS", raising=False)
    monkeypatch.delenv("SIGNCOMM_STALL_WARN_SECONDS", raising=False)
    assert stall_limits() == (60.0, STALL_SECONDS)
    monkeypatch.setenv("SIGNCOMM_STALL_SECONDS", "10")
    assert stall_limits() == (5.0, 10.0)
    monkeypatch.setenv("SIGNCOMM_STALL_SECONDS", "0")
    assert stall_limits()[1] == 0.0
