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

The step: a compressor counts *phases*; its step advances on the first ``compress`` after
a ``decompress``.  A DistributedOptimizer compresses every gradient of a step (in its
hooks) before it decompresses any (in ``synchronize``), so the step is the optimizer's
step; ``hvd.allreduce(t, compression=c)`` is one step per call.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from signcomm import kernels as K
from signcomm.backends import get_backend
from signcomm.comm.base import RankMismatchError
from signcomm.contribution import RPolicy, local_max_abs
from signcomm.kernels.rules import VoteRule

from . import wire as W

MAX_MESSAGE_WORDS = 2 ** 31 - 1   # Horovod's MPI path passes element counts as int
SERIAL_BELOW = 1 << 16   # coordinates: smaller tensors run the kernels on one thread
CONTRIBUTIONS = ("sign", "sr")
VOTES = ("sign", "s1")


def rank_key(seed: int, purpose: K.Purpose, rank: int, step: int, d: int, k: int) -> int:
    """Key of this rank's random bits for one tensor (positions 0..d-1)."""
    return K.key64(K.key64(seed, K.stream_id(purpose, rank), step), d, k)


def shared_key(seed: int, purpose: K.Purpose, step_sum: int, d: int, counts) -> int:
    """Key of the vote's shared random bits for one tensor (positions 0..d-1)."""
    return K.key64(K.key64(seed, K.stream_id(purpose), step_sum), d, W.counts_hash(counts))


@contextmanager
def _threads_for(d):
    """One numba thread for small tensors: waking the kernels' thread pool costs more
    than the work (milliseconds when the cores are busy), and a model has many biases."""
    if d >= SERIAL_BELOW or numba.get_num_threads() == 1:
        yield
        return
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


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
    handles: list = field(default_factory=list)


class MajorityVoteCompressor:
    """A Horovod compressor whose allreduce is a 1-bit majority vote.

    Args (all keyword):
        contribute: ``"sign"`` (each rank sends sign(g); an exact 0 is a fair coin of
            the rank's stream, unbiased) or ``"sr"`` (S_R(g), eq. 8, E = g / R).
        vote: ``"sign"`` (o = sign(c - n/2), eq. 10) or ``"s1"`` (o = S_1((2c - n)/n):
            +1 with probability c/n, eq. 11, drawn from randomness all ranks share).
        R: for ``contribute="sr"``: ``"local"`` (default: this rank's max |g| of the
            tensor, no extra traffic; biased when ranks' gradients differ in scale, see
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
        wire: ``"float64"`` (default; exact under Sum, Average and predivide factors) or
            ``"int64"`` (fewer bits per coordinate; needs op=hvd.Sum).
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
    the allreduce, clamped coordinates (fixed R).
    """

    def __init__(self, *, contribute: str = "sign", vote: str = "sign", R="local",
                 seed: int = 0, tie: str = "coin", process_set=None, size=None, rank=None,
                 named_parameters=None, wire: str = "float64",
                 max_message_words: int = MAX_MESSAGE_WORDS, name: str = "signcomm",
                 backend="auto"):
        if contribute not in CONTRIBUTIONS:
            raise ValueError(f"contribute must be one of {CONTRIBUTIONS}, got {contribute!r}")
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        self.rule = VoteRule("v2" if vote == "s1" else "v1", tie)
        if isinstance(R, str):
            if R != "local":
                raise ValueError(f"R must be 'local' or a positive number, got {R!r} (a "
                                 "shared R needs an extra allreduce per step: use "
                                 "signcomm.MVSM, which batches it)")
        else:
            try:
                r = float(R)
            except (TypeError, ValueError):
                raise ValueError(f"R must be 'local' or a positive number, got {R!r}") from None
            if not (np.isfinite(r) and r > 0):
                raise ValueError(f"R must be positive and finite, got {R!r}")
            R = r
        W.check_wire(wire)
        if (size is None) != (rank is None):
            raise ValueError("give both size= and rank=, or neither")
        if size is not None:
            if process_set is not None:
                raise ValueError("give process_set= or size=/rank=, not both")
            if not (int(size) >= 1 and 0 <= int(rank) < int(size)):
                raise ValueError(f"need size >= 1 and 0 <= rank < size, got {size}, {rank}")
            W.fields_per_word(int(size), wire)
        if int(max_message_words) < W.H + 1:
            raise ValueError(f"max_message_words must be > {W.H} (the header)")
        self.contribute, self.vote, self.R, self.seed, self.tie = (
            contribute, vote, R, int(seed), tie)
        self.process_set = process_set
        self._size = None if size is None else int(size)
        self._rank = None if rank is None else int(rank)
        self._named = list(named_parameters) if named_parameters is not None else None
        self.wire = wire
        get_backend(backend)  # validates the name
        self.backend = backend
        self.max_message_words = int(max_message_words)
        self.name = str(name)
        self._step = -1
        self._phase = "decompress"
        self._k = {}
        self.stats = dict(tensors=0, coordinates=0, messages=0, wire_bytes=0, clamped=0)

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

    # -- the interface ------------------------------------------------------------------
    def compress(self, tensor):
        """Gradient -> (wire tensor of count fields, ctx).  Integer tensors pass through."""
        if not tensor.dtype.is_floating_point:
            return tensor, None
        if self._phase != "compress":
            self._phase = "compress"
            self._step += 1
            self._k.clear()
        n, rank = self.group()
        step = self._step
        x = _flat(tensor)
        d = int(x.shape[0])
        k = self._k.get(d, 0)
        self._k[d] = k + 1
        with _threads_for(d):
            packed, nonfinite = self._bits(x, rank, step, d, k)
        nonce = rank_key(self.seed, K.Purpose.ZERO_COIN, rank, step, d, k + (1 << 40)) >> (
            64 - W.NONCE_BITS)
        parts = W.split(d, n, self.wire, self.max_message_words)
        msgs = [W.encode(packed, o, m, n, rank, step=step, nonfinite=nonfinite, nonce=nonce,
                         wire=self.wire)[0] for o, m in parts]
        ctx = _Context(tensor, tuple(tensor.shape), tensor.dtype, tensor.device, d, n, rank,
                       step, k, parts)
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
        return torch.from_numpy(msgs[0]).to(tensor.device), ctx

    def _bits(self, x, rank, step, d, k):
        """This rank's packed bits (NumPy) and its NaN/Inf count (bits are zeros when > 0).
        ``x`` is the flat gradient on its device; the backend makes the bits there."""
        backend = get_backend(self.backend, x.device)
        if self.contribute == "sign":
            key = rank_key(self.seed, K.Purpose.ZERO_COIN, rank, step, d, k)
        else:
            key = rank_key(self.seed, K.Purpose.STOCHASTIC_SIGN, rank, step, d, k)
        if backend.name == "numba":  # the finite check is fused into the kernels
            v = x.numpy()
            try:
                if self.contribute == "sign":
                    return K.pack_signs(v, zero_key=key), 0
                r = RPolicy(self.R).resolve(local_max_abs(v, [d]))  # local: R = 0 -> 1
                if not np.all(np.isfinite(r)):
                    raise K.NonFiniteError("local R")
                packed, clamped = K.stochastic_sign_pack(v, r, key)
                self.stats["clamped"] += clamped
                return packed, 0
            except K.NonFiniteError:
                return np.zeros(K.packed_nbytes(d), np.uint8), max(1, _count_nonfinite(v))
        nonfinite = int((~torch.isfinite(x)).sum()) if d else 0
        if nonfinite:
            return np.zeros(K.packed_nbytes(d), np.uint8), nonfinite
        if self.contribute == "sign":
            packed = backend.sign_pack(x, key, 0)
        else:
            local = np.array([float(x.abs().max()) if d else 0.0])
            r = RPolicy(self.R).resolve(local)
            packed, clamped = backend.sr_pack(x, r, np.array([d], np.int64), key, 0)
            self.stats["clamped"] += clamped
        return backend.host(packed), 0   # only the packed bits leave the device

    def decompress(self, tensor, ctx):
        """Summed wire tensor -> the vote, +1/-1 (0: tie under "zero") in the gradient's
        dtype, shape and device.  Errors (NaN on some rank, size or group mismatch, an op
        that is not Sum/Average) are raised here, on every rank."""
        if ctx is None:
            return tensor
        self._phase = "decompress"
        outputs = [tensor]
        if ctx.handles:
            hvd = _hvd()
            outputs += [hvd.synchronize(h) for h in ctx.handles]
        n, d = ctx.n, ctx.d
        counts = np.empty(d, W.count_dtype(n))
        describe = lambda: self._describe(ctx)  # noqa: E731  (only built on errors)
        first = None
        for (o, m), out in zip(ctx.parts, outputs):
            dec = W.decode(out.detach().cpu().numpy(), m, n, ctx.rank, counts[o:o + m],
                           wire=self.wire, describe=describe)
            if first is None:
                first = dec
            elif (dec["nonce"], dec["step"]) != (first["nonce"], first["step"]):
                raise RankMismatchError(
                    f"{describe()}: message {ctx.parts.index((o, m))} was summed with "
                    "another tensor's message on some rank (tensors of the same size "
                    "compressed in different orders on different ranks and too large for "
                    "one message: give each a distinct size or raise max_message_words)")
        key = 0
        if self.rule.variant == "v2" or (self.rule.tie == "coin" and n % 2 == 0):
            key = shared_key(self.seed, self.rule.shared_purpose(), first["step"], d, counts)
        with _threads_for(d):
            vote = K.vote_from_counts(counts, n, rule=self.rule, key=key)
            backend = get_backend(self.backend, ctx.device)
            if backend.name == "numba":
                result = torch.from_numpy(K.vote_values(vote, d))
            else:  # decode on the tensor's device from the packed bits (d / 8 bytes)
                nz = vote.nonzero
                result = backend.values(K.Vote(torch.from_numpy(vote.bits).to(ctx.device),
                                               None if nz is None else
                                               torch.from_numpy(nz).to(ctx.device)), d)
        if ctx.dtype != torch.float32:
            result = result.to(ctx.dtype)
        return result.view(ctx.shape).to(ctx.device)

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
    """Each rank sends S_R(g) (eq. 8); the result is sign of the mean (MVSM-v1's and
    Sto-signSGD's aggregation, eq. 10)."""

    def __init__(self, *, R="local", seed: int = 0, tie: str = "coin", **options):
        super().__init__(contribute="sr", vote="sign", R=R, seed=seed, tie=tie, **options)


class S1Compressor(MajorityVoteCompressor):
    """Each rank sends S_R(g); the result is S_1 of the mean (MVSM-v2, eq. 11): +1 with
    probability c/n, the same draw on every rank."""

    def __init__(self, *, R="local", seed: int = 0, **options):
        super().__init__(contribute="sr", vote="s1", R=R, seed=seed, **options)


class Compression:
    """Ready-made compressors, like ``hvd.Compression``: default options, one instance
    each (a step counter per instance; build your own for other options)."""

    sign = SignCompressor()
    sr = SRCompressor()
    s1 = S1Compressor()
