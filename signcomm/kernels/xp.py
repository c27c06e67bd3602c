"""Array-module dispatch: the same code runs on NumPy (CPU) and CuPy (GPU) arrays."""
from __future__ import annotations

import numpy as np


def array_module(a):
    """``numpy`` or ``cupy``, whichever owns ``a`` (CuPy is imported only if ``a`` is one)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import cupy
        return cupy
    return np


def is_cupy(a) -> bool:
    return array_module(a) is not np


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError, driver missing
        return False
