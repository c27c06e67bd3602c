#!/usr/bin/env bash
# Set up .venv from nothing: torch, numpy, numba, MPICH + mpi4py from PyPI, the test
# tools, and Horovod 0.28.1 built from its sdist with patches/horovod-0.28.1.patch.
#
# Idempotent: a stamp in .venv records what was installed; a second run with the same
# inputs returns at once.  The built Horovod wheel is cached in $SIGNCOMM_CACHE
# (default ~/.cache/signcomm) keyed by Python, torch and patch; its RUNPATH is relative
# to the module, so a fresh clone on a machine that built it once installs it in seconds.
#
# Environment:
#   TORCH_SPEC      pip requirement for torch (default torch==2.13.0; a bare "torch"
#                   may pull a multi-GB CUDA build)
#   PYTHON          interpreter used to create .venv (default python3)
#   SIGNCOMM_CACHE  wheel cache directory (default ~/.cache/signcomm)
#   SKIP_HOROVOD=1  do not build or install Horovod (the MPI-only parts still work)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOROVOD_VERSION=0.28.1
PATCH="$ROOT/patches/horovod-$HOROVOD_VERSION.patch"
CACHE=${SIGNCOMM_CACHE:-$HOME/.cache/signcomm}
SKIP_HOROVOD=${SKIP_HOROVOD:-0}

step() { printf '\n== setup: %s\n' "$*"; }
fail() {
    printf '\nsetup FAILED: %s\n' "$1" >&2
    printf 'what to do: %s\n' "$2" >&2
    exit 1
}

# Everything that decides what gets installed goes into the stamp.
stamp_inputs() {
    cat "$ROOT/scripts/setup.sh" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$PATCH"
    echo "$TORCH_SPEC $PYTHON $SKIP_HOROVOD"
}
STAMP_WANT=$(stamp_inputs | sha256sum | cut -c1-16)
STAMP_FILE="$VENV/.signcomm-setup-stamp"
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP_WANT" ]; then
    echo "setup: .venv is up to date ($STAMP_WANT)"
    exit 0
fi

step "virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON" \
        "install Python 3.9+ with the venv module (Debian: apt-get install python3-venv), or set PYTHON=/path/to/python3"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
export PATH="$VENV/bin:$PATH"

step "torch ($TORCH_SPEC)"
"${PIP[@]}" "$TORCH_SPEC" || fail "pip could not install '$TORCH_SPEC'" \
    "set TORCH_SPEC to a torch requirement pip can reach, e.g. TORCH_SPEC='torch==2.13.0' (CPU) or an index URL of your CUDA build"

step "MPICH, mpi4py, numpy, numba, build and test tools, signcomm itself"
"${PIP[@]}" "setuptools>=64" wheel cmake "mpich" "mpi4py>=4" \
    || fail "pip could not install MPICH/mpi4py/build tools" "check network access to PyPI, then rerun make setup"
"${PIP[@]}" -e "$ROOT[dev]" || fail "pip could not install signcomm with its dev extra" \
    "read the pip error above; the requirements are in setup.cfg"
command -v mpirun >/dev/null || fail "mpirun not found after installing the mpich wheel" \
    "check that $VENV/bin/mpirun exists; on a machine with a system MPI, make sure $VENV/bin comes first in PATH"
"$PY" - <<'EOF' || fail "mpi4py does not import or cannot initialise MPI" "run: .venv/bin/python -c 'from mpi4py import MPI; print(MPI.Get_library_version())'"
from mpi4py import MPI
print("setup: mpi4py", MPI.Get_library_version().splitlines()[0])
EOF

if [ "$SKIP_HOROVOD" = 1 ]; then
    echo "setup: SKIP_HOROVOD=1, Horovod not installed"
else
    TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
    PY_TAG=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    PATCH_HASH=$(sha256sum "$PATCH" | cut -c1-8)
    WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-$PY_TAG-torch$TORCH_VERSION-$PATCH_HASH"
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        step "building Horovod $HOROVOD_VERSION from source against torch $TORCH_VERSION (about 8 minutes on 2 cores)"
        BUILD=$(mktemp -d)
        trap 'rm -rf "$BUILD"' EXIT
        "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
            "horovod==$HOROVOD_VERSION" -d "$BUILD" \
            || fail "could not download the Horovod $HOROVOD_VERSION sdist" "check network access to PyPI"
        tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
        (cd "$BUILD/horovod-$HOROVOD_VERSION" && patch -p1 --forward <"$PATCH") \
            || fail "patches/horovod-$HOROVOD_VERSION.patch did not apply" "the sdist changed; regenerate the patch"
        export CMAKE_POLICY_VERSION_MINIMUM=3.5
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        export MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS=${HOROVOD_BUILD_ARCH_FLAGS:-}
        mkdir -p "$WHEEL_DIR"
        "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps \
            -w "$BUILD/wheel" "$BUILD/horovod-$HOROVOD_VERSION" >"$BUILD/build.log" 2>&1 || {
            tail -40 "$BUILD/build.log" >&2
            cp "$BUILD/build.log" "$CACHE/horovod-build-failed.log"
            fail "building Horovod failed (full log: $CACHE/horovod-build-failed.log)" \
                "it needs g++ with C++17, MPICH's mpicxx in .venv/bin and torch headers; or run with SKIP_HOROVOD=1 to use the MPI transport only"
        }
        # The wheel goes into a cache shared by every clone: it must not point at this
        # venv (the patch makes the RUNPATH relative to the module; check it did).
        if command -v readelf >/dev/null; then
            mkdir "$BUILD/check" && (cd "$BUILD/check" && "$PY" -m zipfile -e "$BUILD"/wheel/horovod-*.whl .)
            for so in $(find "$BUILD/check" -name '*.so'); do
                if readelf -d "$so" | grep -E 'R(UN)?PATH' | grep "$VENV" >/dev/null; then
                    fail "the built $(basename "$so") has an absolute RUNPATH into $VENV, so the cached wheel would break in another clone" \
                        "check that patches/horovod-$HOROVOD_VERSION.patch sets CMAKE_INSTALL_RPATH and applied"
                fi
            done
        fi
        mv "$BUILD"/wheel/horovod-*.whl "$WHEEL_DIR"/
    else
        step "Horovod wheel from cache $WHEEL_DIR"
    fi
    "${PIP[@]}" "$WHEEL_DIR"/horovod-*.whl || fail "installing the cached Horovod wheel failed" \
        "delete $WHEEL_DIR to force a rebuild"
    step "checking Horovod: built with PyTorch, MPI and Gloo, runs in MPI mode"
    CHECK=$(horovodrun --check-build 2>&1) || fail "horovodrun --check-build failed: $CHECK" "delete $WHEEL_DIR and rerun"
    for need in PyTorch MPI Gloo; do
        grep -qF "[X] $need" <<<"$CHECK" || fail "horovodrun --check-build does not list $need (is horovod.torch importable? try: $PY -c 'import horovod.torch'): $CHECK" \
            "delete $WHEEL_DIR and rerun make setup"
    done
    # Only rank 0 reports, in one write: horovodrun prefixes each chunk it reads with
    # "[rank]", so two ranks printing word by word interleave ("[1] MPI[1]  [1] 2").
    MODE=$(timeout 120 horovodrun -np 2 "$PY" -c 'import sys, horovod.torch as hvd; hvd.init(); hvd.rank() == 0 and sys.stdout.write("mode=%s size=%d\n" % ("MPI" if hvd.mpi_enabled() else "GLOO", hvd.size())); sys.stdout.flush()' 2>&1) \
        || fail "horovodrun -np 2 failed: $MODE" "check that .venv/bin/mpirun is MPICH (mpirun --version)"
    echo "$MODE" | sed -E 's/\[[0-9]+\] ?//g' | grep "mode=MPI size=2" >/dev/null || fail "horovodrun did not run in MPI mode: $MODE" \
        "check that .venv/bin/mpirun comes first in PATH and is MPICH"
    echo "setup: horovodrun -np 2 runs in MPI mode"
fi

echo "$STAMP_WANT" >"$STAMP_FILE"
step "done"
