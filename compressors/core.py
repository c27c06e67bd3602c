"""Sign, S_R and S_1 majority-vote compressors with Horovod's compression interface.

``compress(tensor) -> (wire tensor, ctx)`` turns this rank's gradient into one bit per
coordinate (sign, or S_R of eq. 8) and packs the bits as count fields (``wire.py``);
Horovod allreduces the wire tensor like any other; ``decompress(tensor, ctx)`` measures the
scale the allreduce applied, recovers the exact counts c (number of ranks whose bit is
+1), votes, and returns +1/-1 (0 for a tie under ``tie="zero"``) in the gradient's dtype,
shape and device.  The user's optimizer then steps with lr as the sign step size.

Randomness (all counter-based, ``signcomm.kernels.rng``):

- this rank's bits (S_R noise, the fair coin for an exact 0 under sign) use
  ``rank_key(seed, purpose, rank, step, d, k)``: the rank's own stream, the compressor's
  step, the tensor's size d and k, its index among the tensors of size d compressed in
  this step on this rank.  Hook order can permute k among same-sized tensors; that only
  swaps which fresh noise a tensor gets, the noise stays independent across ranks.
- the vote's shared bits (tie coins for even n, the S_1 draw of eq. 11) use
  ``shared_key(seed, purpose, step_sum, d, counts)``: the sum of the ranks' steps and a
  hash of the counts, both read from the allreduce's result, which is the same on every
  rank.  So every rank draws the same bits, whatever order its hooks fired in.

R for S_R (``R=``): ``"common"`` (default) is one bound per tensor that every rank
derives from the previous step's allreduce result, with no extra collective: each message
carries the rank's max-|g| exponent in its header (``wire.py``); the summed header gives
E, the exponent of the max over ranks, and the next step uses R = 2**(E/q) for that
tensor on every rank (the least power of 2**(1/q) at or above that max; q = 4 for
n <= 15).  A tensor's first step (and the step after an all-zero one) has no bound yet
and uses the rank's own max |g| (``"local"``, as R did before), counted in
``stats["r_first"]``.  Coordinates above the bound are clamped (probability 0 or 1) and
counted in ``stats["clamped_common"]``.  Tensors are identified across steps by the name
Horovod allreduces them under (read from the calling DistributedOptimizer or
``hvd.allreduce``), else by (size, index among same-sized tensors); ranks check in every
header that they used the same R (``stats["r_mismatch"]`` counts disagreements).

The wire (``wire=``): ``"auto"`` (default) takes the cheapest exact one for each
allreduce: ``"int64-radix"`` when the caller allreduces with a plain ``op=hvd.Sum`` (read
from the DistributedOptimizer or ``hvd.allreduce`` frame that calls ``compress``),
``"float64-radix"`` otherwise (exact under any Sum/Average scaling).

The step: a compressor counts *phases*; its step advances on the first ``compress`` after
a ``decompress``.  A DistributedOptimizer compresses every gradient of a step (in its
hooks) before it decompresses any (in ``synchronize``), so the step is the optimizer's
step; ``hvd.allreduce(t, compression=c)`` is one step per call.

Agreement (issue 18): every header carries the compressor's ``settings`` (kind, tie, R
policy and value, seed: ``settings.py``); ranks that differ raise ``RankMismatchError`` on
every rank, naming the setting.  A NaN/Inf on any rank raises ``NonFiniteGradientError`` on
every rank and leaves the compressor as before that step (step counter, bounds); under a
DistributedOptimizer the error is raised by ``step()`` (a step pre-hook), after
``synchronize()`` has collected every handle, so ``zero_grad()`` and the next batch work
(docs/compressors.md, "A NaN batch").
"""
from __future__ import annotations

import math
import sys
import warnings
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from signcomm import kernels as K
from signcomm.backends import get_backend
from signcomm.comm.base import RankMismatchError
from signcomm.contribution import RPolicy, local_max_abs
from signcomm.kernels.rules import VoteRule

from . import settings as S
from . import wire as W

MAX_MESSAGE_WORDS = 2 ** 31 - 1   # Horovod's MPI path passes element counts as int
CONTRIBUTIONS = ("sign", "sr")
VOTES = ("sign", "s1")
R_POLICIES = ("common", "local")
WIRE_OPTIONS = ("auto",) + W.WIRES
_HVD_CALLERS = ("_allreduce_grad_async", "_grouped_allreduce_grad_async", "allreduce",
                "grouped_allreduce", "<listcomp>")


def rank_key(seed: int, purpose: K.Purpose, rank: int, step: int, d: int, k: int) -> int:
    """Key of this rank's random bits for one tensor (positions 0..d-1)."""
    return K.key64(K.key64(seed, K.stream_id(purpose, rank), step), d, k)


def shared_key(seed: int, purpose: K.Purpose, step_sum: int, d: int, counts, mix=None) -> int:
    """Key of the vote's shared random bits for one tensor (positions 0..d-1); ``mix``:
    the counts' whole-word hash sum if the decode took it (``W.counts_hash``)."""
    return K.key64(K.key64(seed, K.stream_id(purpose), step_sum), d,
                   W.counts_hash(counts, mix))


@lru_cache(maxsize=4096)
def _common_r(e: int, n: int, wire: str):
    """(R, header r_code) of the common bound of exponent e for n ranks on ``wire``."""
    return RPolicy(W.bound(e, n)).resolve(np.zeros(1))[0], 1 + e - W.exponent_range(n, wire)[0]


@lru_cache(maxsize=64)
def _fixed_r(r: float):
    """A fixed R as RPolicy resolves it."""
    return RPolicy(r).resolve(np.zeros(1))[0]


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as e:  # pragma: no cover - make setup installs it
        raise RuntimeError("signcomm compressors need horovod.torch (or explicit size= and "
                           "rank= outside Horovod)") from e
    return hvd


def _flat(tensor):
    """Flat contiguous float32/float64 gradient on its own device (fp16/bf16 via float32)."""
    x = tensor.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    return x.reshape(-1).contiguous()


def _on(t, device):
    """``t`` on ``device`` (a CPU tensor stays as it is: ``.to`` costs microseconds even
    when it has nothing to do, and a model has many tensors)."""
    return t if device.type == "cpu" else t.to(device)


def _zero_bits(d):
    """The packed bits a rank with NaN/Inf sends (all 0: nothing is applied)."""
    return np.zeros(K.packed_nbytes(d), np.uint8)


def _count_nonfinite(x) -> int:
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def _find_name(tensor, named):
    """The parameter name of gradient ``tensor``: from ``named_parameters`` if the user
    gave them, else from the Horovod optimizer on the call stack (its
    ``_parameter_names``; read only, best effort), else None."""
    for name, p in named or ():
        if p is tensor or p.grad is tensor:
            return name
    f = sys._getframe(1)
    for _ in range(12):
        if f is None:
            break
        names = getattr(f.f_locals.get("self"), "_parameter_names", None)
        if isinstance(names, dict):
            for p, name in names.items():
                if isinstance(p, torch.Tensor) and p.grad is tensor:
                    return name
        f = f.f_back
    return None


def _synchronizing_optimizer():
    """The Horovod DistributedOptimizer whose ``synchronize()`` is decompressing (read
    from the call stack, like ``_caller``), or None (``hvd.allreduce`` and other callers,
    or an optimizer without torch's step hooks)."""
    f = sys._getframe(1)
    for _ in range(8):
        if f is None:
            break
        if f.f_code.co_name == "synchronize" and \
                str(f.f_globals.get("__name__", "")).startswith("horovod."):
            opt = f.f_locals.get("self")
            if isinstance(opt, torch.optim.Optimizer) and \
                    callable(getattr(opt, "register_step_pre_hook", None)):
                return opt
            return None
        f = f.f_back
    return None


def _caller(depth=2):
    """(name, plain_sum) of the Horovod allreduce that is calling ``compress``: the
    tensor's allreduce name (None if unknown or shared by a group) and whether the op is
    a plain Sum (no pre/postscale; False: Average or scaled; None: not called from a
    Horovod allreduce we know).  Read from the caller's frame, best effort: the
    DistributedOptimizer's ``_allreduce_grad_async`` / ``_grouped_allreduce_grad_async``,
    or ``hvd.allreduce`` / ``hvd.grouped_allreduce``."""
    try:
        f = sys._getframe(depth)
    except ValueError:
        return None, None
    for _ in range(4):
        if f is None:
            break
        if f.f_code.co_name in _HVD_CALLERS and \
                str(f.f_globals.get("__name__", "")).startswith("horovod."):
            try:
                return _read_caller(f)
            except Exception:  # noqa: BLE001 - an unknown Horovod version: no hint
                return None, None
        f = f.f_back
    return None, None


def _read_caller(f):
    from horovod.torch import mpi_ops
    code, loc = f.f_code.co_name, f.f_locals
    if code == "<listcomp>":   # the grouped paths compress in a list comprehension
        parent = f.f_back
        if parent is None:
            return None, None
        p = loc.get("p")
        code, loc = parent.f_code.co_name, parent.f_locals
        if code == "_grouped_allreduce_grad_async":
            self = loc["self"]
            return self._parameter_names.get(p), self.op == mpi_ops.Sum
    if code == "_allreduce_grad_async":
        self = loc["self"]
        return loc.get("name"), self.op == mpi_ops.Sum
    if code == "_grouped_allreduce_grad_async":
        return None, loc["self"].op == mpi_ops.Sum
    if code in ("allreduce", "grouped_allreduce"):
        op, average = loc.get("op"), loc.get("average")
        if op is None:
            op = mpi_ops.Sum if average is False else mpi_ops.Average
        plain = (op == mpi_ops.Sum and float(loc.get("prescale_factor", 1.0)) == 1.0 and
                 float(loc.get("postscale_factor", 1.0)) == 1.0)
        return (loc.get("name") if code == "allreduce" else None), plain
    return None, None


@dataclass
class _Context:
    tensor: object            # the gradient given to compress (for error messages)
    shape: tuple
    dtype: object
    device: object
    d: int
    n: int
    rank: int
    step: int
    k: int
    parts: list
    wire: str = "float64"
    key: object = None        # the tensor's identity for the common R
    r: object = None          # the R this rank's S_R used (None for sign)
    settings: object = None   # the settings its messages carried
    handles: list = field(default_factory=list)


class MajorityVoteCompressor:
    """A Horovod compressor whose allreduce is a 1-bit majority vote.

    Args (all keyword):
        contribute: ``"sign"`` (each rank sends sign(g); an exact 0 is a fair coin of
            the rank's stream, unbiased) or ``"sr"`` (S_R(g), eq. 8, E = g / R).
        vote: ``"sign"`` (o = sign(c - n/2), eq. 10) or ``"s1"`` (o = S_1((2c - n)/n):
            +1 with probability c/n, eq. 11, drawn from randomness all ranks share).
        R: for ``contribute="sr"``: ``"common"`` (default: one bound per tensor, the same
            on every rank: the least power of 2**(1/4) (2**(1/2) above 15 ranks, 2 above
            255) at or above the max over ranks of max |g| at the previous step, carried
            in the message headers; a tensor's first step
            uses the rank's own max; coordinates above the bound are clamped and counted
            in ``stats["clamped_common"]``), ``"local"`` (this rank's max |g|: no
            clamping, but biased when ranks' gradients differ in scale, see
            docs/compressors.md) or a positive number (fixed R; |g| > R is clamped and
            counted in ``stats["clamped"]``).  A tensor that is all zeros has local R = 0
            and sends fair coins (S_R(0) for any R > 0).
        seed: seeds every random stream (int).
        tie: ``"coin"`` (default: a tied vote, 2c = n with even n, is a fair coin shared
            by all ranks) or ``"zero"`` (o = 0 there).  Unused by ``vote="s1"``.
        process_set: the Horovod process set the allreduce runs over (give the same one
            as to the DistributedOptimizer); default the global set.
        size, rank: the group size and this rank's index, for use without Horovod (then
            the caller sums the wire tensors); default: from Horovod at each compress.
        named_parameters: optional (name, parameter) pairs, only to name a tensor in
            error messages (without them the name is looked up in the calling
            DistributedOptimizer).
        wire: ``"auto"`` (default: ``"int64-radix"`` for an allreduce with a plain
            op=hvd.Sum, ``"float64-radix"`` otherwise), ``"float64"`` / ``"float64-radix"``
            (exact under Sum, Average and predivide factors) or ``"int64"`` /
            ``"int64-radix"`` (fewer bits per coordinate; need op=hvd.Sum).  The radix
            wires store the counts in base n + 1, the binary ones in ceil(log2(n + 1))
            bits (docs/compressors.md has the bits per coordinate of each).
        backend: where the bits are made and the vote decoded (``signcomm.backends``):
            ``"auto"`` (numba for CPU tensors, torch ops on the tensor's device for CUDA
            ones: only the packed bits and the wire words cross to the host, never the
            fp32 gradient), ``"numba"`` or ``"torch"``; same results.
        max_message_words: words per allreduce message; a tensor that needs more is
            split and the extra messages are allreduced (op=Sum) by the compressor itself,
            under the Horovod names ``{name}.{contribute}.{vote}.s{seed}.d{size}.t{step}.
            k{index}.m{message}``, the same on every rank (two compressors with the same
            name, kinds and seed that split same-sized tensors in the same step would
            collide: give them different names).
        name: prefix of those message names (default "signcomm").

    ``stats`` counts, on this rank: tensors, coordinates, messages, wire bytes sent to
    the allreduce, clamped coordinates (fixed R: ``clamped``; common R:
    ``clamped_common``), tensor-steps that used the first-step rule of the common R
    (``r_first``) and tensor-steps whose ranks did not all use the same R
    (``r_mismatch``).
    """

    def __init__(self, *, contribute: str = "sign", vote: str = "sign", R="common",
                 seed: int = 0, tie: str = "coin", process_set=None, size=None, rank=None,
                 named_parameters=None, wire: str = "auto",
                 max_message_words: int = MAX_MESSAGE_WORDS, name: str = "signcomm",
                 backend="auto"):
        if contribute not in CONTRIBUTIONS:
            raise ValueError(f"contribute must be one of {CONTRIBUTIONS}, got {contribute!r}")
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        self.rule = VoteRule("v2" if vote == "s1" else "v1", tie)
        what = "R must be 'common', 'local' or a positive number"
        if isinstance(R, str):
            if R not in R_POLICIES:
                raise ValueError(f"{what}, got {R!r} (an R shared within the step needs an "
                                 "extra allreduce per step: use signcomm.MVSM, which batches "
                                 "it)")
        else:
            if isinstance(R, bool):
                raise ValueError(f"{what}, got {R!r}")
            try:
                r = float(R)
            except (TypeError, ValueError):
                raise ValueError(f"{what}, got {R!r}") from None
            if not (np.isfinite(r) and r > 0):
                raise ValueError(f"R must be positive and finite, got {R!r}")
            R = r
        if wire not in WIRE_OPTIONS:
            raise ValueError(f"wire must be one of {WIRE_OPTIONS}, got {wire!r}")
        if (size is None) != (rank is None):
            raise ValueError("give both size= and rank=, or neither")
        if size is not None:
            if process_set is not None:
                raise ValueError("give process_set= or size=/rank=, not both")
            if not (int(size) >= 1 and 0 <= int(rank) < int(size)):
                raise ValueError(f"need size >= 1 and 0 <= rank < size, got {size}, {rank}")
            W.fields_per_word(int(size), "float64-radix" if wire == "auto" else wire)
        if int(max_message_words) < W.H + 1:
            raise ValueError(f"max_message_words must be > {W.H} (the header)")
        self.contribute, self.vote, self.R, self.seed, self.tie = (
            contribute, vote, R, int(seed), tie)
        self.process_set = process_set
        self._size = None if size is None else int(size)
        self._rank = None if rank is None else int(rank)
        self._named = list(named_parameters) if named_parameters is not None else None
        self.wire = wire
        self.wire_used = None
        get_backend(backend)  # validates the name
        self.backend = backend
        self.max_message_words = int(max_message_words)
        self.name = str(name)
        self._step = -1
        self._phase = "decompress"
        self._k = {}
        self._bounds = {}     # tensor identity -> (E, n): its next common R is W.bound(E, n)
        self._before = (-1, {})   # (step, bounds) before this phase: restored after a NaN
        self._nonfinite = []  # this phase's NaN/Inf errors (a DistributedOptimizer's step)
        self._pending = None  # the optimizer step pre-hook that raises them
        self._warned = False
        self._pool = {}       # (what, length, dtype) -> buffers to reuse once nothing holds them
        self.stats = dict(tensors=0, coordinates=0, messages=0, wire_bytes=0, clamped=0,
                          clamped_common=0, r_first=0, r_mismatch=0)

    def __repr__(self):
        opts = f"contribute={self.contribute!r}, vote={self.vote!r}"
        if self.contribute == "sr":
            opts += f", R={self.R!r}"
        return f"{type(self).__name__}({opts}, seed={self.seed}, tie={self.tie!r}, wire={self.wire!r})"

    @property
    def _tag(self):
        return f"{self.name}.{self.contribute}.{self.vote}.s{self.seed}"

    @property
    def step(self) -> int:
        """The current step (-1 before the first compress)."""
        return self._step

    @property
    def settings(self) -> S.Settings:
        """The settings every message carries for the agreement check (``settings.py``)."""
        return S.Settings(self.contribute, self.vote, self.tie, self.R, self.seed)

    @property
    def common(self) -> bool:
        """True when S_R uses the common R (``R="common"`` and ``contribute="sr"``)."""
        return self.contribute == "sr" and self.R == "common"

    def bounds(self) -> dict:
        """The common R each known tensor gets at its next step: {identity: R}, where the
        identity is ``("name", allreduce name, size)`` or ``("index", size, k)``."""
        return {key: W.bound(e, n) for key, (e, n) in self._bounds.items()}

    # -- group --------------------------------------------------------------------------
    def group(self):
        """(n, rank) of the group the allreduce runs over."""
        if self._size is not None:
            return self._size, self._rank
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: call hvd.init() before compressing")
        ps = self.process_set
        if ps is None:
            return hvd.size(), hvd.rank()
        if not ps.included():
            raise RuntimeError(f"{type(self).__name__}: this rank ({hvd.rank()}) is not in "
                               f"the compressor's process set {ps}")
        return ps.size(), ps.rank()

    def _wire_for(self, plain_sum) -> str:
        if self.wire != "auto":
            return self.wire
        return "int64-radix" if plain_sum else "float64-radix"

    def _buffer(self, what, length, dtype):
        """A NumPy buffer to write into: one of this compressor's earlier ones that no
        tensor references any more (the caller dropped the gradient, Horovod the wire
        tensor), else a new one kept for later.  Fresh memory costs a page fault per 4
        KiB on first touch, a sizeable part of the codec's time at 25M coordinates."""
        pool = self._pool.setdefault((what, int(length), np.dtype(dtype).str), deque())
        for _ in range(len(pool)):   # oldest first: the one most likely free again
            buf = pool[0]
            pool.rotate(-1)          # (a model's many same-sized tensors: O(1), not O(n))
            if sys.getrefcount(buf) <= 3:   # the pool, ``buf`` and getrefcount's argument
                return buf
        buf = K.aligned_empty(int(length), dtype)   # (streamed stores need 32 bytes)
        pool.append(buf)
        return buf

    # -- the interface ------------------------------------------------------------------
    def compress(self, tensor):
        """Gradient -> (wire tensor of count fields, ctx).  Integer tensors pass through."""
        if not tensor.dtype.is_floating_point:
            return tensor, None
        if self._phase != "compress":
            self._phase = "compress"
            self._before = (self._step, dict(self._bounds))
            self._step += 1
            self._k.clear()
            self._nonfinite = []
            if self._pending is not None:   # step() was not called after synchronize()
                self._pending.remove()
                self._pending = None
        n, rank = self.group()
        step = self._step
        name, plain_sum = _caller() if self._size is None else (None, None)
        wire = self._wire_for(plain_sum)
        x = _flat(tensor)
        d = int(x.shape[0])
        k = self._k.get(d, 0)
        self._k[d] = k + 1
        key = ("name", name, d) if name is not None else ("index", d, k)
        packed, nonfinite, r, r_code, exponent = self._bits(x, n, rank, step, d, k, key, wire)
        nonce = rank_key(self.seed, K.Purpose.ZERO_COIN, rank, step, d, k + (1 << 40)) >> (
            64 - W.NONCE_BITS)
        parts = W.split(d, n, wire, self.max_message_words)
        settings = self.settings
        msgs = [W.encode(packed, o, m, n, rank, step=step, nonfinite=nonfinite, nonce=nonce,
                         wire=wire, exponent=exponent, r_code=r_code, settings=settings,
                         out=self._buffer("wire", W.message_words(m, n, wire),
                                          W.message_dtype(wire)))[0]
                for o, m in parts]
        ctx = _Context(tensor, tuple(tensor.shape), tensor.dtype, tensor.device, d, n, rank,
                       step, k, parts, wire, key, r, settings)
        self.wire_used = wire
        if len(msgs) > 1:
            if self._size is not None:
                raise ValueError(f"{type(self).__name__}: {d} coordinates need {len(msgs)} "
                                 "messages; sending the extra ones needs Horovod (no size=)")
            hvd = _hvd()
            ps = self.process_set if self.process_set is not None else hvd.global_process_set
            for c, msg in enumerate(msgs[1:], 1):
                t = torch.from_numpy(msg).to(tensor.device)
                ctx.handles.append(hvd.allreduce_async_(
                    t, name=f"{self._tag}.d{d}.t{step}.k{k}.m{c}", op=hvd.Sum,
                    process_set=ps))
        st = self.stats
        st["tensors"] += 1
        st["coordinates"] += d
        st["messages"] += len(msgs)
        st["wire_bytes"] += sum(m.nbytes for m in msgs)
        return _on(torch.from_numpy(msgs[0]), tensor.device), ctx

    def _known_r(self, key, n, wire):
        """``_r_for``'s answer when it does not depend on this step's max |g| (a fixed R;
        the common R once this tensor has a bound at this n), else None.  No side effects."""
        if self.R == "common":
            e, bn = self._bounds.get(key, (None, n))
            if e is None or bn != n:
                return None
            return _common_r(e, n, wire) + ("clamped_common",)
        if self.R == "local":
            return None
        return _fixed_r(self.R), 0, "clamped"

    def _r_for(self, key, local_max, n, wire):
        """(R as an RPolicy resolves it, r_code for the header, which stats key counts
        its clamps) for a tensor whose local max |g| is ``local_max``."""
        known = self._known_r(key, n, wire)
        if known is not None:
            return known
        if self.R == "common":   # a tensor's first step: its own max (docs/compressors.md)
            self.stats["r_first"] += 1
        return RPolicy("local").resolve(np.array([local_max]))[0], 0, None   # R = 0 -> 1

    def _bits(self, x, n, rank, step, d, k, key, wire):
        """This rank's packed bits (NumPy), its NaN/Inf count (bits are zeros when > 0),
        the R it used, the R code and max-|g| exponent for the header.  ``x`` is the flat
        gradient on its device; the backend makes the bits there."""
        backend = get_backend(self.backend, x.device)
        if self.contribute == "sign":
            key_rng = rank_key(self.seed, K.Purpose.ZERO_COIN, rank, step, d, k)
            if backend.name == "numba":   # the finite check is fused into the kernel
                v = x.numpy()
                try:
                    return K.pack_signs(v, zero_key=key_rng), 0, None, 0, None
                except K.NonFiniteError:
                    return _zero_bits(d), max(1, _count_nonfinite(v)), None, 0, None
            nonfinite = int((~torch.isfinite(x)).sum()) if d else 0
            if nonfinite:
                return _zero_bits(d), nonfinite, None, 0, None
            return backend.host(backend.sign_pack(x, key_rng, 0)), 0, None, 0, None
        key_rng = rank_key(self.seed, K.Purpose.STOCHASTIC_SIGN, rank, step, d, k)
        known = self._known_r(key, n, wire) if backend.name == "numba" else None
        if known is not None:   # R known before the pass: S_R finds max |g| as it goes
            v = x.numpy()
            r, r_code, counter = known
            packed, clamped, found = K.stochastic_sign_pack(v, r, key_rng, check_finite=False,
                                                            max_abs=True)
            local = float(found[0])   # NaN if v has a NaN (as local_max_abs)
            if not math.isfinite(local):
                return _zero_bits(d), max(1, _count_nonfinite(v)), None, 0, None
            self.stats[counter] += int(clamped)
            exponent = W.max_exponent(local, n) if self.common else None
            return packed, 0, float(r), r_code, exponent
        if backend.name == "numba":
            v = x.numpy()
            local = float(local_max_abs(v, [d])[0])   # NaN if v has a NaN
        else:
            local = float(x.abs().max()) if d else 0.0
        if not math.isfinite(local):
            count = _count_nonfinite(x.numpy()) if backend.name == "numba" else \
                int((~torch.isfinite(x)).sum())
            return _zero_bits(d), max(1, count), None, 0, None
        r, r_code, counter = self._r_for(key, local, n, wire)
        if backend.name == "numba":
            packed, clamped = K.stochastic_sign_pack(v, r, key_rng)
        else:
            packed, clamped = backend.sr_pack(x, np.array([r]), np.array([d], np.int64),
                                              key_rng, 0)
            packed = backend.host(packed)   # only the packed bits leave the device
        if counter is not None:
            self.stats[counter] += int(clamped)
        exponent = W.max_exponent(local, n) if self.common else None
        return packed, 0, float(r), r_code, exponent

    def decompress(self, tensor, ctx):
        """Summed wire tensor -> the vote, +1/-1 (0: tie under "zero") in the gradient's
        dtype, shape and device.  Errors (settings, size or group mismatch, an op that is
        not Sum/Average) are raised here, on every rank.  NaN/Inf on some rank raises
        ``NonFiniteGradientError`` here too, except under a DistributedOptimizer's
        ``synchronize()``, which must finish first: there it is raised by the
        optimizer's ``step()`` (``_defer_nonfinite``)."""
        if ctx is None:
            return tensor
        self._phase = "decompress"
        outputs = [tensor]
        if ctx.handles:
            hvd = _hvd()
            outputs += [hvd.synchronize(h) for h in ctx.handles]
        n, d = ctx.n, ctx.d
        counts = self._buffer("counts", d, W.count_dtype(n))   # scratch, free again below
        describe = lambda: self._describe(ctx)  # noqa: E731  (only built on errors)
        try:
            first = self._decode(outputs, ctx, counts, describe)
        except W.NonFiniteGradientError as e:
            if not self._defer_nonfinite(e):
                raise
            return torch.full(ctx.shape, float("nan"), dtype=ctx.dtype, device=ctx.device)
        if self.common and not self._nonfinite:   # (a NaN step keeps the old bounds)
            if first.exponent is None:   # all zeros on every rank: no bound yet
                self._bounds.pop(ctx.key, None)
            else:
                self._bounds[ctx.key] = (first.exponent, n)
        if not first.r_agree:
            self.stats["r_mismatch"] += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"{describe()}: the ranks did not all use the same R for S_R "
                              "(different R options, or a tensor that is identified "
                              "differently on some rank: see docs/compressors.md, 'R for "
                              "S_R'); counted in stats['r_mismatch']", RuntimeWarning,
                              stacklevel=2)
        key = 0
        if self.rule.variant == "v2" or (self.rule.tie == "coin" and n % 2 == 0):
            key = shared_key(self.seed, self.rule.shared_purpose(), first["step"], d, counts,
                             first.mix)
        backend = get_backend(self.backend, ctx.device)
        if backend.name == "numba":   # the vote and its values in one pass
            result = torch.from_numpy(K.vote_values_from_counts(
                counts, n, rule=self.rule, key=key,
                out=self._buffer("values", d, np.float32)))
        else:  # decode on the tensor's device from the packed bits (d / 8 bytes)
            vote = K.vote_from_counts(counts, n, rule=self.rule, key=key)
            nz = vote.nonzero
            result = backend.values(K.Vote(torch.from_numpy(vote.bits).to(ctx.device),
                                           None if nz is None else
                                           torch.from_numpy(nz).to(ctx.device)), d)
        if ctx.dtype != torch.float32:
            result = result.to(ctx.dtype)
        return _on(result.view(ctx.shape), ctx.device)

    def _decode(self, outputs, ctx, counts, describe):
        """Decode every summed message of one tensor into ``counts``; the first one's
        ``wire.Decoded``, whose ``mix`` is the counts' whole-word hash sum over all the
        messages (uint8 counts; else None)."""
        first = None
        mix_all = counts.dtype == np.uint8
        for (o, m), out in zip(ctx.parts, outputs):
            dec = W.decode(out.detach().cpu().numpy(), m, ctx.n, ctx.rank, counts[o:o + m],
                           wire=ctx.wire, describe=describe, settings=ctx.settings,
                           mix_base=o // 8 if mix_all else None)
            if first is None:
                first = dec
                continue
            if mix_all:
                first.mix = (first.mix + dec.mix) & W.MASK64
            if (dec["nonce"], dec["step"]) != (first["nonce"], first["step"]):
                raise RankMismatchError(
                    f"{describe()}: message {ctx.parts.index((o, m))} was summed with "
                    "another tensor's message on some rank (tensors of the same size "
                    "compressed in different orders on different ranks and too large for "
                    "one message: give each a distinct size or raise max_message_words)")
        return first

    def _defer_nonfinite(self, error) -> bool:
        """A NaN/Inf on some rank: every rank gets here, for the same tensor.  The step
        then changes nothing of the compressor: its step counter and the common R's
        bounds go back to what they were before it (so a skipped batch leaves no trace).
        Under a DistributedOptimizer's ``synchronize()`` the error waits, so that Horovod
        collects every handle and the optimizer stays usable: the gradient becomes NaN
        and a step pre-hook (``torch.optim.Optimizer.register_step_pre_hook``) raises it
        before the wrapped optimizer updates anything.  Returns whether it waits."""
        if not self._nonfinite:
            self._step, bounds = self._before
            self._bounds = dict(bounds)
        self._nonfinite.append(str(error))
        opt = _synchronizing_optimizer()
        if opt is None:
            return False
        if self._pending is None:
            self._pending = opt.register_step_pre_hook(self._raise_nonfinite)
        return True

    def _raise_nonfinite(self, optimizer, args, kwargs):
        """The step pre-hook of a step whose gradients had NaN/Inf on some rank."""
        self._pending.remove()
        self._pending = None
        msgs = sorted(self._nonfinite)   # the same first message on every rank
        more = f"; {len(msgs) - 1} more tensor(s) of this step too" if len(msgs) > 1 else ""
        raise W.NonFiniteGradientError(
            f"{msgs[0]}{more}; optimizer.step() skipped this batch on every rank: call "
            "zero_grad() and go on with the next one")

    def _describe(self, ctx):
        name = _find_name(ctx.tensor, self._named)
        what = f"gradient {name!r}" if name else "a gradient"
        return (f"{type(self).__name__}: {what} of shape {tuple(ctx.shape)} "
                f"({str(ctx.dtype).replace('torch.', '')}) at step {ctx.step}")


class SignCompressor(MajorityVoteCompressor):
    """signSGD with majority vote: each rank sends sign(g), the result is sign(sum)
    (ties: a shared fair coin, or 0 with ``tie="zero"``)."""

    def __init__(self, *, seed: int = 0, tie: str = "coin", **options):
        super().__init__(contribute="sign", vote="sign", seed=seed, tie=tie, **options)


class SRCompressor(MajorityVoteCompressor):
    """Each rank sends S_R(g) (eq. 8) of its raw gradient with the common R; the result
    is the sign of the mean (eq. 10): Sto-signSGD's aggregation (with a momentum in the
    user's optimizer it acts after the vote: this is not MVSM, docs/compressors.md)."""

    def __init__(self, *, R="common", seed: int = 0, tie: str = "coin", **options):
        super().__init__(contribute="sr", vote="sign", R=R, seed=seed, tie=tie, **options)


class S1Compressor(MajorityVoteCompressor):
    """Each rank sends S_R(g) of its raw gradient with the common R; the result is S_1 of
    the mean (eq. 11): +1 with probability c/n, the same draw on every rank, so
    E[o] = mean(g) / R.  The aggregation MVSM-v2 applies to momenta, here applied to raw
    gradients (docs/compressors.md)."""

    def __init__(self, *, R="common", seed: int = 0, **options):
        super().__init__(contribute="sr", vote="s1", R=R, seed=seed, **options)


class Compression:
    """Ready-made compressors, like ``hvd.Compression``: default options, one instance
    each (a step counter and the common R's bounds per instance; build your own for
    other options)."""

    sign = SignCompressor()
    sr = SRCompressor()
    s1 = S1Compressor()
