"""train.py turns every bad path or out-of-range number into one line and exit 2, before
any collective (checked the same way on every rank)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "mpi_examples" / "train.py"


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT), env=env)


def cases(tmp):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return [
        (["--metrics", "/proc/no/such/dir/m.jsonl"], "--metrics"),
        (["--metrics", a_file / "m.jsonl"], "--metrics"),
        (["--metrics", tmp], "is a folder"),
        (["--out-dir", a_file], "--out-dir"),
        (["--seed", str(2 ** 32)], "below 2**32"),
    ]


@pytest.mark.parametrize("i", range(5))
def test_bad_paths_and_numbers_exit_2_with_one_line(tmp_path, i):
    args, needle = cases(tmp_path)[i]
    p = run_cli(*args, "--epochs", 1)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if needle in ln]
    assert len(errors) == 1, p.stderr
