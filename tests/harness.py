"""Multi-rank test harness.

Pytest side: ``launch(script, n, launcher="mpirun" | "horovodrun" | "torchrun" | "torch",
args=..., timeout=...)`` runs ``mpirun -np n python script ...`` (or ``horovodrun -np n
...``, ``torchrun --nproc-per-node n ...``; "torch" starts the n processes directly with
torchrun's environment, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which skips
the agent's own start-up) as a subprocess in
its own process group, kills the whole group when the timeout passes, and returns one
``dict`` of results per rank.  A job that fails, hangs or leaves a rank without a result
fails the test with every rank's output.

Rank side: ``save_result(**values)`` writes this rank's arrays and scalars to
``$SIGNCOMM_RESULT_DIR/rank<r>.npz`` (no pickles).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
RESULT_DIR_ENV = "SIGNCOMM_RESULT_DIR"


class JobFailed(AssertionError):
    """A multi-rank job exited non-zero, timed out or left a rank without a result."""


def _bin(name):
    venv_bin = Path(sys.executable).parent
    path = venv_bin / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise JobFailed(f"{name} not found: run `make setup` (it installs MPICH and Horovod into .venv)")
    return found


def _rank():
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    try:
        from mpi4py import MPI
        return MPI.COMM_WORLD.Get_rank()
    except ImportError:
        return 0


def save_result(**values):
    """Rank side: store this rank's results for the launching test."""
    out = os.environ.get(RESULT_DIR_ENV)
    if not out:
        return
    arrays = {k: np.asarray(v) for k, v in values.items()}
    for k, a in arrays.items():
        if a.dtype == object:
            raise TypeError(f"result {k!r} is not a plain array or scalar")
    tmp = Path(out) / f".rank{_rank()}.npz"
    np.savez(tmp, **arrays)
    tmp.replace(Path(out) / f"rank{_rank()}.npz")


class Job:
    """What a finished job left: per-rank results and the combined output."""

    def __init__(self, results, output, returncode):
        self.results = results
        self.output = output
        self.returncode = returncode

    def __getitem__(self, rank):
        return self.results[rank]

    def __len__(self):
        return len(self.results)


def launch(script, n, *, launcher="mpirun", args=(), timeout=120, env=None,
           expect_failure=False, need_results=True):
    """Run ``script`` (path, or a file name under tests/workers) on ``n`` ranks."""
    script = Path(script)
    if not script.is_absolute() and not script.exists():
        script = WORKERS / script
    with tempfile.TemporaryDirectory(prefix="signcomm-job-") as out:
        job_env = dict(os.environ)
        job_env.update(env or {})
        job_env[RESULT_DIR_ENV] = out
        job_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(ROOT / "tests"), job_env.get("PYTHONPATH", "")])
        job_env["PYTHONUNBUFFERED"] = "1"
        # n ranks share this machine's cores: one compute thread each unless told otherwise
        threads = str(max(1, (os.cpu_count() or 1) // max(n, 1)))
        for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            job_env.setdefault(var, threads)
        job_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + job_env.get("PATH", "")
        if launcher == "mpirun":
            cmd = [_bin("mpirun"), "-np", str(n)]
        elif launcher == "horovodrun":
            cmd = [_bin("horovodrun"), "-np", str(n), "--mpi"]
        elif launcher == "python":
            if n != 1:
                raise ValueError("launcher='python' runs one process (an MPI singleton)")
            cmd = []
        elif launcher == "torchrun":
            cmd = [_bin("torchrun"), "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
        elif launcher == "torch":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--spawn", str(n)]
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
        if launcher in ("torchrun", "torch"):
            cmd += [str(script), *map(str, args)]
        else:
            # `python -m mpi4py` turns an uncaught exception on one rank into MPI_Abort, so
            # the job ends at once instead of the other ranks waiting forever.
            cmd += [sys.executable, "-m", "mpi4py", str(script), *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=job_env, cwd=str(ROOT), start_new_session=True, text=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise JobFailed(f"{launcher} -np {n} {script.name} hung: killed after {timeout}s\n"
                            f"--- output ---\n{output}")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stray ranks, if any
            except ProcessLookupError:
                pass
        if expect_failure:
            if proc.returncode == 0:
                raise JobFailed(f"{script.name} was expected to fail but exited 0\n{output}")
            return Job([], output, proc.returncode)
        if proc.returncode != 0:
            raise JobFailed(f"{launcher} -np {n} {script.name} exited {proc.returncode}\n"
                            f"--- output ---\n{output}")
        results = []
        if need_results:
            for r in range(n):
                path = Path(out) / f"rank{r}.npz"
                if not path.exists():
                    raise JobFailed(f"rank {r} of {n} left no result\n--- output ---\n{output}")
                with np.load(path, allow_pickle=False) as z:
                    results.append({k: z[k] for k in z.files})
        return Job(results, output, proc.returncode)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n, script, args):
    """launcher="torch": n ranks with torchrun's environment; the first rank to fail
    ends the others (as torchrun's agent does), so nothing waits forever."""
    import time
    port = str(_free_port())
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env))
    rc = 0
    while any(p.poll() is None for p in procs):
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad:
            time.sleep(5)  # let the other ranks print their own error first
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            rc = bad[0]
            break
        time.sleep(0.05)
    for p in procs:
        p.wait()
        rc = rc or p.returncode
    return rc


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--spawn":
    sys.exit(_spawn(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
