"""Ranks in lockstep: start from rank 0's parameters and state, and check now and then
that every rank still holds bit-identical parameters."""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..comm import get_transport


class LockstepError(RuntimeError):
    """Ranks' parameters diverged (raised on every rank)."""


def _params(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        return list(model_or_params.parameters())
    return list(model_or_params)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()


def broadcast_state(model_or_params, optimizer=None, transport=None, root: int = 0):
    """Overwrite every rank's parameters (and the optimizer's tensor state) with rank
    ``root``'s.  Call once after building the model and optimizer.  The hierarchical
    vote's ``momentum_shard`` state is left alone: each rank holds another shard."""
    transport = get_transport(transport)
    tensors = [p.data for p in _params(model_or_params)]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for k, v in state.items() if torch.is_tensor(v) and k != "momentum_shard"]
    with transport.ledger.kind("control"):
        # a fixed-length signature (count, hash of the layout): ranks with a different
        # number of tensors must get the mismatch error, not an MPI length error or a hang
        transport.agree((len(tensors), tuple((tuple(t.shape), str(t.dtype)) for t in tensors)),
                        what="broadcast_state (parameter shapes and dtypes)")
        for t in tensors:
            got = transport.broadcast(_bytes(t), root)
            with torch.no_grad():
                t.copy_(torch.from_numpy(got).view(t.dtype).reshape(t.shape))


def parameter_checksum(model_or_params) -> int:
    """crc32 over the bytes of every parameter, in order."""
    crc = 0
    for p in _params(model_or_params):
        crc = zlib.crc32(_bytes(p.data), crc)
    return crc


def check_lockstep(model_or_params, transport=None, step=None):
    """Raise ``LockstepError`` on every rank if any rank's parameters differ."""
    transport = get_transport(transport)
    crc = parameter_checksum(model_or_params)
    with transport.ledger.kind("control"):
        top = transport.allreduce(np.array([crc, -crc], np.int64), "max")
    if top[0] != -top[1]:
        raise LockstepError(f"parameters diverged across ranks at step {step} "
                            f"(rank {transport.rank} checksum {crc:#010x})")
