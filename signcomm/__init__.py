"""signcomm: data-parallel training that sends signs instead of floats.

The torch-facing names are imported lazily, so the kernel and vote layers (and
``mpirun`` jobs that use only them) never import torch."""
__version__ = "0.1.0"

_OPTIM = {"MVSM", "Signum", "SignSGD", "create_optimizer", "broadcast_state",
          "check_lockstep", "LockstepError", "NAMES", "load_checkpoint", "CheckpointError"}


def __getattr__(name):
    if name in _OPTIM:
        from . import optim
        return getattr(optim, name)
    raise AttributeError(f"module 'signcomm' has no attribute {name!r}")


__all__ = sorted(_OPTIM)
