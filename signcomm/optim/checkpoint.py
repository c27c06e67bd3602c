"""Checkpoints: read a file safely, and check an optimizer state before it is used.

- ``load_checkpoint(path)``: ``torch.load(weights_only=True)`` (no code runs from the
  file) with one clear ``CheckpointError`` naming the file when it is missing,
  truncated or corrupt.
- ``validate_state(params, state_dict)``: what ``MVSM.load_state_dict`` checks before
  changing anything: the parameter count, each momentum's shape (it must match its
  parameter's) and finiteness (a NaN momentum would move its tensor every step,
  forever), and the ``signcomm`` step counter (an int in [0, 2**62)).  The error names
  the field.
- ``check_layout(state_dict, layout)``: under the hierarchical vote a rank's momentum is
  its shard of its machine's (``momentum_shard``), so a checkpoint resumes only on the
  layout that wrote it: the same machines H, ranks per machine k, ``bucket_elements``
  and local rank.
"""
from __future__ import annotations

import math

import torch

MAX_STEP = 1 << 62
# the whole tensor's momentum (flat vote); a rank's flat share of it (hierarchical vote)
MOMENTUM_KEYS = ("momentum_buffer", "momentum_shard")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, or a field out of range)."""


def load_checkpoint(path, map_location="cpu"):
    """The state saved at ``path`` (e.g. ``opt.state_dict()`` written by ``torch.save``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001  torch raises many kinds for bad files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): the "
            "file is truncated, corrupt or not a torch checkpoint; use another copy (each rank "
            "writes its own) or restart from an earlier one") from None


def validate_state(params, state_dict):
    """Raise ``CheckpointError`` naming the first field that cannot be loaded."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise CheckpointError("optimizer state must be a dict with 'state' and 'param_groups' "
                              "(what MVSM.state_dict() returns)")
    ids = [i for g in state_dict["param_groups"] for i in g.get("params", ())]
    if len(ids) != len(params):
        raise CheckpointError(f"param_groups: the checkpoint has {len(ids)} parameters, this "
                              f"optimizer {len(params)}")
    for i, p in zip(ids, params):
        for key in MOMENTUM_KEYS:
            m = state_dict["state"].get(i, {}).get(key)
            if m is not None:
                _check_momentum(f"state[{i}][{key!r}]", m, p, key)
    meta = state_dict.get("signcomm")
    if meta is not None:
        step = meta.get("step") if isinstance(meta, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
            raise CheckpointError(f"signcomm['step'] must be an int in [0, 2**62), got {step!r}")
        for key in ("seed", "rank", "size"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or \
                    (key == "size" and value < 1) or not math.isfinite(value):
                raise CheckpointError(f"signcomm[{key!r}] must be a non-negative int, got {value!r}")


def _check_momentum(field, m, p, key):
    if not torch.is_tensor(m):
        raise CheckpointError(f"{field} is a {type(m).__name__}, not a tensor")
    if key == "momentum_buffer" and tuple(m.shape) != tuple(p.shape):
        raise CheckpointError(f"{field} has shape {tuple(m.shape)}, its parameter "
                              f"{tuple(p.shape)}")
    if key == "momentum_shard" and (m.dim() != 1 or m.numel() > p.numel()):
        raise CheckpointError(f"{field} has shape {tuple(m.shape)}: a share of its parameter's "
                              f"{p.numel()} coordinates must be flat and no longer")
    if not m.is_floating_point() or not bool(torch.isfinite(m).all()):
        raise CheckpointError(f"{field} is not finite (or not floating point): a NaN/Inf "
                              "momentum would move every coordinate of its tensor forever")


LAYOUT_KEYS = ("machines", "ranks_per_node", "bucket_elements")


def _describe(h):
    if h is None:
        return "a flat vote"
    return (f"the hierarchical vote on {h.get('machines')} machines x {h.get('ranks_per_node')} "
            f"ranks (bucket_elements={h.get('bucket_elements')})")


def check_layout(state_dict, layout):
    """``layout``: this optimizer's hierarchical layout (a dict with ``machines``,
    ``ranks_per_node``, ``bucket_elements``, ``local_rank``) or None (a flat vote).
    Raises ``CheckpointError`` when the checkpoint was written under another one."""
    meta = state_dict.get("signcomm") if isinstance(state_dict, dict) else None
    saved = meta.get("hierarchy") if isinstance(meta, dict) else None
    if saved is not None and not isinstance(saved, dict):
        raise CheckpointError(f"signcomm['hierarchy'] must be a dict, got {type(saved).__name__}")
    if saved is None and layout is None:
        return
    if saved is None or layout is None or any(saved.get(k) != layout[k] for k in LAYOUT_KEYS):
        raise CheckpointError(
            f"signcomm['hierarchy']: the checkpoint was written by {_describe(saved)}, this "
            f"optimizer runs {_describe(layout)}; under the hierarchical vote each rank keeps "
            "only its shard of its machine's momentum, so a checkpoint resumes only on the "
            "layout that wrote it (the same machines, ranks per machine and bucket_elements)")
    if saved.get("local_rank") != layout["local_rank"]:
        raise CheckpointError(
            f"signcomm['hierarchy']: the checkpoint holds the momentum shards of local rank "
            f"{saved.get('local_rank')}, this rank is local rank {layout['local_rank']}: load "
            "the file this rank wrote")
