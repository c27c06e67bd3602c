import importlib.util

import pytest

from harness import launch  # noqa: F401  (re-exported for tests)


def have_horovod() -> bool:
    return importlib.util.find_spec("horovod") is not None


requires_horovod = pytest.mark.skipif(not have_horovod(), reason="Horovod not installed (make setup builds it)")


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile the numba kernels once, in this process, before any multi-rank job:
    otherwise every rank of the first jobs would compile them at the same time."""
    from signcomm.kernels.warmup import warmup
    warmup()


@pytest.fixture
def mpi_job():
    """The harness's launch(): run a worker on n ranks, get per-rank results."""
    return launch
