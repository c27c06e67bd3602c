#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU whose python3 already has
# torch, numba, mpi4py and pytest (CuPy optional) and no internet:
#
#     bash scripts/gpu_check.sh [LOG]          # default LOG: gpu_check.log
#
# Wheels it may need (an MPI library for mpi4py, e.g. PyPI's `mpich`; pytest-timeout;
# hypothesis) are installed from the folder $SIGNCOMM_WHEELS (default: wheels/) when it
# exists, never from the network.  Runs: the tests marked `gpu` (torch backend on CUDA
# == numba kernels; MVSM on CUDA parameters over 1 rank and over 2 ranks sharing the GPU
# through mpirun), then the kernel benchmark and the optimizer step benchmark on CUDA next
# to a device-to-device copy.  Each part has its own time limit; the whole stays under
# 8 minutes.  Exit status: that of the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu_check.log}
WHEELS=${SIGNCOMM_WHEELS:-wheels}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$HOME/.local/bin:$PATH"
{
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"
  $PY - <<'PY'
import importlib
for m in ("torch", "numba", "mpi4py", "cupy", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{m}: not importable ({exc})")
import torch
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
  if [ -d "$WHEELS" ]; then
    echo "== installing from $WHEELS (no network)"
    $PY -m pip install --no-index --find-links "$WHEELS" --user mpich pytest-timeout hypothesis 2>&1 | tail -3
  fi
  command -v mpirun >/dev/null || echo "mpirun not on PATH: the 2-rank test will fail (carry the mpich wheel in $WHEELS)"
  $PY -c "from mpi4py import MPI; print('MPI:', MPI.Get_library_version().splitlines()[0])" || true
  echo "== tests marked gpu"
  timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_torch_backend.py
  rc=$?
  echo "== kernel benchmark, torch backend on CUDA (d = 25.6M, n = 8)"
  timeout 60 $PY benchmarks/kernel_bench.py --device cuda --repeat 9
  if $PY -c "import cupy" 2>/dev/null; then
    echo "== kernel benchmark, CuPy reference path"
    timeout 60 $PY benchmarks/kernel_bench.py --device cuda --backend kernels --repeat 5
  fi
  echo "== optimizer step on CUDA, ResNet-50 parameter set, 1 rank"
  timeout 90 $PY benchmarks/optim_bench.py --device cuda --no-horovod --steps 5 --breakdown
  echo "== tests exit status: $rc"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
