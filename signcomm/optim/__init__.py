"""Torch optimizers: MVSM and the majority-vote family, single-node Signum/signSGD."""
from .buckets import DEFAULT_BUCKET_ELEMENTS, plan_buckets
from .checkpoint import CheckpointError, load_checkpoint
from .lockstep import LockstepError, broadcast_state, check_lockstep, parameter_checksum
from .majority import MVSM
from .presets import NAMES, PRESETS, create_optimizer
from .single import Signum, SignSGD

__all__ = ["MVSM", "Signum", "SignSGD", "create_optimizer", "NAMES", "PRESETS",
           "broadcast_state", "check_lockstep", "parameter_checksum", "LockstepError",
           "plan_buckets", "DEFAULT_BUCKET_ELEMENTS", "CheckpointError", "load_checkpoint"]
