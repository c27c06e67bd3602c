"""Transports: the collectives the vote needs, over mpi4py, Horovod or torch.distributed,
with a byte ledger."""
from __future__ import annotations

from .base import (RankMismatchError, RemoteRankError, StallError, Transport, TransportError)
from .ledger import Ledger, Record, StepSummary, ring_allreduce_bytes


def horovod_initialized() -> bool:
    """True when horovod.torch is importable *and* hvd.init() has been called; never
    imports Horovod unless it is already imported."""
    import sys
    hvd = sys.modules.get("horovod.torch")
    if hvd is None:
        return False
    try:
        return bool(hvd.is_initialized())
    except Exception:
        return False


def get_transport(spec=None, **kwargs) -> Transport:
    """A transport from ``"mpi"``, ``"horovod"``, ``"torch"`` (torch.distributed), an
    existing ``Transport`` (returned as is) or ``None`` (Horovod when it is initialised in
    this process, else torch.distributed when it is initialised, else MPI)."""
    if isinstance(spec, Transport):
        return spec
    if spec is None:
        from .torchdist import dist_initialized
        spec = "horovod" if horovod_initialized() else "torch" if dist_initialized() else "mpi"
    if spec == "torch":
        from .torchdist import TorchDistTransport
        return TorchDistTransport(**kwargs)
    if spec == "mpi":
        from .mpi import MPITransport
        return MPITransport(**kwargs)
    if spec == "horovod":
        from .horovod import HorovodTransport
        return HorovodTransport(**kwargs)
    raise ValueError(f"transport must be 'mpi', 'horovod', 'torch', a Transport or None, "
                     f"got {spec!r}")


def MPITransport(*args, **kwargs):  # noqa: N802  (a lazy class alias)
    from .mpi import MPITransport as cls
    return cls(*args, **kwargs)


def HorovodTransport(*args, **kwargs):  # noqa: N802
    from .horovod import HorovodTransport as cls
    return cls(*args, **kwargs)


def TorchDistTransport(*args, **kwargs):  # noqa: N802
    from .torchdist import TorchDistTransport as cls
    return cls(*args, **kwargs)


__all__ = ["Transport", "TransportError", "RankMismatchError", "RemoteRankError", "StallError", "Ledger",
           "Record", "StepSummary", "ring_allreduce_bytes", "get_transport",
           "horovod_initialized", "MPITransport", "HorovodTransport", "TorchDistTransport"]
