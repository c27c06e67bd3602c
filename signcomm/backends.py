"""Array backends: where the one-bit kernels run, chosen per buffer.

A backend has a native array type and the same operations on it (the math of each is
stated once, in ``signcomm.kernels`` and docs/algorithms.md; the backends are ways to
run it and must give identical bits):

- ``numba`` (NumPy arrays; the default for CPU tensors): the compiled kernels of
  ``signcomm.kernels``.  torch CPU tensors enter and leave as zero-copy views.
- ``torch`` (torch tensors on any device, CUDA included): ``signcomm.kernels.torch_ops``,
  pure torch ops, bit-identical to the numba kernels on CPU.
- ``cupy``: the slot for fused CuPy kernels on CUDA buffers (not built yet: asking for
  it raises ``BackendError``; ``auto`` uses ``torch`` on CUDA meanwhile).

Vote-level operations (``sign_pack``, ``sr_pack``, ``vote``, ``decide``, count fields,
``values``) take and return native arrays; the step-level ones (``momentum``,
``apply``) take torch tensors, the optimizer's own buffers.  Packed bits follow
``kernels/bits.py``; random words ``kernels/rng.py``.
"""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .kernels import _step
from .kernels.rules import VoteRule

BACKENDS = ("auto", "numba", "torch", "cupy")
NONFINITE_BITS = 0x7F800000  # |x| bit patterns at or above this are Inf or NaN


class BackendError(ValueError):
    """A backend cannot run on the given buffers (wrong device, not installed)."""


def bits_to_float(bits) -> float:
    """An fp32 bit pattern (int) as a Python float."""
    return float(np.uint32(bits).view(np.float32))


class Backend:
    """The operations every backend provides (see the module docstring)."""

    name = "abstract"
    devices = ()

    def check_device(self, device):
        if device.type not in self.devices:
            raise BackendError(f"backend {self.name!r} cannot run on {device.type} tensors "
                               f"(it runs on {', '.join(self.devices)}); use backend='auto'")

    # -- conversions and array helpers ---------------------------------------------
    def from_torch(self, t):
        raise NotImplementedError

    def to_torch(self, a):
        raise NotImplementedError

    def zeros(self, n, like, dtype=None):
        raise NotImplementedError

    def cat(self, arrays):
        raise NotImplementedError

    def copy(self, a):
        raise NotImplementedError

    def host(self, a) -> np.ndarray:
        """A small native array (per-tensor maxima, counts) as NumPy."""
        raise NotImplementedError


class NumbaBackend(Backend):
    """The compiled CPU kernels on NumPy arrays."""

    name = "numba"
    devices = ("cpu",)

    def from_torch(self, t):
        self.check_device(t.device)
        return t.detach().numpy()

    def to_torch(self, a):
        import torch
        return torch.from_numpy(a)

    def zeros(self, n, like, dtype=None):
        return np.zeros(n, dtype or like.dtype)

    def cat(self, arrays):
        return np.concatenate(arrays)

    def copy(self, a):
        return a.copy()

    def host(self, a):
        return np.asarray(a)

    # -- contributions: sign, S_R (eq. 8) ---------------------------------------------
    def sign_pack(self, v, zero_key, offset):
        return K.pack_signs(v, zero_key=zero_key, offset=offset, check_finite=False)

    def sr_pack(self, v, r, seg_sizes, key, offset):
        return K.stochastic_sign_pack(v, r, key, seg_sizes=seg_sizes, offset=offset,
                                      check_finite=False)

    def invert(self, packed, d):
        np.invert(packed, out=packed)
        return K.clear_padding(packed, d)

    # -- the vote (eq. 10, 11) ---------------------------------------------------------
    def vote(self, gathered, d, rule: VoteRule, key, offset):
        return K.majority_vote(gathered, d, rule=rule, key=key, offset=offset)

    def decide(self, counts, n, rule: VoteRule, key, offset):
        return K.vote_from_counts(counts, n, rule=rule, key=key, offset=offset)

    def count_fields(self, packed, d, b):
        return K.pack_count_fields(packed, d, b)

    def fields_to_counts(self, words, d, b):
        return K.unpack_count_fields(words, d, b)

    def values(self, vote, d, out=None):
        """The vote as float32 +1 / -1 (0 where a tie mask says so)."""
        return K.vote_values(vote, d, out=out)

    # -- the step around the vote (torch tensors) ---------------------------------------
    def momentum(self, v, g, out, beta, mode):
        """eq. (9) into ``out`` (flat fp32 CPU tensors), fused with max |g| (the finite
        check) and max |out| (R's local max); returns the two as fp32 bit patterns."""
        if mode != _step.MODE_LERP or fused_lerp_ok():
            gm, vm = _step.momentum_pass(v.numpy() if v is not None else out.numpy(),
                                         g.numpy(), out.numpy(), beta, mode)
            return int(gm), int(vm)
        import torch  # torch's lerp rounds otherwise on this machine: use it
        from .kernels import torch_ops
        torch.lerp(v, g, beta, out=out)
        return int(torch_ops._max_abs_bits(g)), int(torch_ops._max_abs_bits(out))

    def apply(self, p, vote, start, lr, wd):
        """x <- x (1 - lr wd) - lr o on the flat view ``p`` of one parameter, o read from
        the packed bits at ``start`` (fp32: one numba pass; fp16/bf16: torch's ops)."""
        decay = (1 - lr * wd) if wd else None
        if str(p.dtype) == "torch.float32":
            _step.apply_signs(p.numpy(), vote.bits, start, np.float32(-lr),
                              nonzero=vote.nonzero, decay=decay)
            return
        from .kernels import torch_ops
        torch_ops.apply_signs(p, self.to_torch(vote.bits), start, -lr,
                              None if vote.nonzero is None else self.to_torch(vote.nonzero),
                              decay)


class TorchBackend(Backend):
    """Pure torch ops (``kernels.torch_ops``) on tensors of any device."""

    name = "torch"
    devices = ("cpu", "cuda")

    def __init__(self):
        import torch
        from .kernels import torch_ops
        self.torch, self.ops = torch, torch_ops

    def from_torch(self, t):
        return t.detach()

    def to_torch(self, a):
        return a

    def zeros(self, n, like, dtype=None):
        return self.torch.zeros(n, dtype=dtype or like.dtype, device=like.device)

    def cat(self, arrays):
        return self.torch.cat(arrays)

    def copy(self, a):
        return a.clone()

    def host(self, a):
        return a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)

    def sign_pack(self, v, zero_key, offset):
        return self.ops.sign_pack(v, zero_key=zero_key, offset=offset)[0]

    def sr_pack(self, v, r, seg_sizes, key, offset):
        packed, _, clamped = self.ops.stochastic_sign_pack(v, r, seg_sizes, key, offset)
        return packed, int(clamped)

    def invert(self, packed, d):
        out = self.torch.bitwise_not(packed)
        if d % 8 and out.shape[0]:
            out[K.packed_nbytes(d) - 1] &= (1 << (d % 8)) - 1
        return out

    def vote(self, gathered, d, rule: VoteRule, key, offset):
        rule.check_key(key)
        n = gathered.shape[0]
        bits, nonzero = self.ops.majority_vote(gathered, d, rule.mode, key, offset)
        return K.Vote(bits, nonzero if rule.has_zeros(n) else None)

    def decide(self, counts, n, rule: VoteRule, key, offset):
        rule.check_key(key)
        bits, nonzero = self.ops.decide_from_counts(counts, n, rule.mode, key, offset)
        return K.Vote(bits, nonzero if rule.has_zeros(n) else None)

    def count_fields(self, packed, d, b):
        return self.ops.pack_count_fields(packed, d, b)

    def fields_to_counts(self, words, d, b):
        return self.ops.unpack_count_fields(words, d, b)

    def values(self, vote, d, out=None):
        o = self.ops.values(vote.bits, vote.nonzero, d)
        if out is not None:
            out.copy_(o)
            return out
        return o

    def momentum(self, v, g, out, beta, mode):
        return self.ops.momentum_pass(v if v is not None else out, g, out, beta, mode)

    def apply(self, p, vote, start, lr, wd):
        self.ops.apply_signs(p, vote.bits, start, -lr, vote.nonzero,
                             (1 - lr * wd) if wd else None)


_INSTANCES = {}


def get_backend(spec="auto", device=None) -> Backend:
    """The backend named ``spec`` (a ``Backend`` is returned as is); ``"auto"`` picks
    numba for CPU buffers and torch for CUDA ones (``device``: a torch.device or a
    device type string; None means CPU).  Raises ``BackendError`` if it cannot run there."""
    if isinstance(spec, Backend):
        backend = spec
    else:
        if spec not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or a Backend, got {spec!r}")
        dev_type = getattr(device, "type", device) or "cpu"
        name = spec if spec != "auto" else ("numba" if dev_type == "cpu" else "torch")
        if name == "cupy":
            raise BackendError("backend 'cupy' (fused CuPy kernels) is not built yet; use "
                               "backend='torch' (or 'auto') for CUDA tensors")
        if name not in _INSTANCES:
            _INSTANCES[name] = NumbaBackend() if name == "numba" else TorchBackend()
        backend = _INSTANCES[name]
    if device is not None:
        import torch
        backend.check_device(torch.device(device) if isinstance(device, str) else device)
    return backend


_FUSED_LERP = None


def fused_lerp_ok() -> bool:
    """True when ``_step.momentum_pass`` gives torch's ``lerp`` bit for bit on this
    machine (torch's vectorised CPU lerp is an FMA where the CPU has one); checked once."""
    global _FUSED_LERP
    if _FUSED_LERP is None:
        import torch
        gen = np.random.default_rng(12345)
        v = (gen.standard_normal(4099) * 10.0 ** gen.integers(-3, 4, 4099)).astype(np.float32)
        g = (gen.standard_normal(4099) * 10.0 ** gen.integers(-3, 4, 4099)).astype(np.float32)
        ok = True
        for w in (0.1, 0.7):
            ref = torch.lerp(torch.from_numpy(v), torch.from_numpy(g), w).numpy()
            out = np.empty_like(v)
            _step.momentum_pass(v, g, out, w, _step.MODE_LERP)
            ok &= bool(np.array_equal(ref.view(np.uint32), out.view(np.uint32)))
        _FUSED_LERP = ok
    return _FUSED_LERP
