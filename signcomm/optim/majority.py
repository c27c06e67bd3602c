"""MVSM and the majority-vote family as one ``torch.optim.Optimizer``.

Per rank j and parameter (Algorithm 2):
  momentum, eq. (9):   v_1 = g_1,  v_t = (1 - beta) v_{t-1} + beta g_t   (local, never sent)
  contribution:        S_R(v_t) (eq. 8), or sign(v_t) for the sign methods, one bit each
  vote:                o = sign(mean) (v1, eq. 10) or S_1(mean) (v2, eq. 11), same on all ranks
  update:              x <- x - lr * o   (- lr * weight_decay * x, decoupled, if asked)
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from .. import kernels as K
from ..comm import get_transport
from ..comm.base import Transport
from ..kernels import _step
from ..vote import R_POLICIES, SCHEDULES, SignVote
from .buckets import DEFAULT_BUCKET_ELEMENTS, plan_buckets
from .common import check_beta, check_group, check_lr
from .lockstep import check_lockstep

CONTRIBUTIONS = ("sr", "sign")
MOMENTUM_INITS = ("first", "zero")


def _max_abs(tensors):
    """max |x| of each tensor as one fp32 tensor (NaN if it has a NaN, inf if an inf); one
    aminmax pass each, several times faster than ``_foreach_norm(.., inf)`` on CPU."""
    out = []
    for t in tensors:
        if t.is_sparse:
            raise TypeError("sparse gradients are not supported")
        if t.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float32))
            continue
        lo, hi = torch.aminmax(t)
        out.append(torch.maximum(hi, -lo).float())
    return torch.stack(out) if out else torch.zeros(0)


NONFINITE_BITS = 0x7F800000  # |x| bit patterns at or above this are Inf or NaN
_FUSED_LERP = None  # does _step's fused lerp round as this torch build's lerp_? (checked once)


def _fused_lerp_ok() -> bool:
    """True when ``_step.momentum_pass`` gives torch's ``lerp`` bit for bit on this machine
    (torch's vectorised CPU lerp is an FMA where the CPU has one); else the momentum
    is computed with torch."""
    global _FUSED_LERP
    if _FUSED_LERP is None:
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


def _bits_to_float(bits) -> float:
    return float(np.uint32(bits).view(np.float32))


class _Momenta:
    """The momentum of one layout, one flat fp32 buffer per bucket, twice: step t reads
    side ``cur`` and writes v_t into the other side, which becomes ``cur`` (and the
    parameters' ``state[p]["momentum_buffer"]``, views of it) only once the vote has
    succeeded.  S_R reads the written side directly, so buckets need no concatenation."""

    def __init__(self, key, buckets):
        self.key = key
        self.flat, self.views, self.arrays = [], [], []
        self.cur = [0] * len(buckets)
        for b in buckets:
            pair = [torch.empty(b.d, dtype=torch.float32) for _ in range(2)]
            starts = np.concatenate([[0], np.cumsum(b.sizes)]).astype(np.int64)
            self.flat.append(pair)
            self.views.append([[side[int(starts[j]):int(starts[j + 1])].view(p.shape)
                                for j, p in enumerate(b.params)] for side in pair])
            self.arrays.append([[a[int(starts[j]):int(starts[j + 1])]
                                 for j in range(len(b.params))] for a in (side.numpy() for side in pair)])


class MVSM(torch.optim.Optimizer):
    """Majority vote signSGD with momentum (the paper's Algorithm 2) and, through its
    options, the whole majority-vote family (see ``signcomm.create_optimizer``).

    Args (conventions):
        lr: the sign step size eta: each coordinate moves by exactly ``lr`` (or 0 on a
            tie under ``tie="zero"``).
        beta: weight of the NEW gradient in the momentum, the paper's convention, in
            (0, 1]; ``beta = 1`` means no momentum.  PyTorch-style momentum mu = 1 - beta.
        variant: "v1" (o = sign of the mean, eq. 10) or "v2" (o = S_1 of the mean, eq. 11).
        R: bound of S_R, per tensor: "global" (default: max over ranks of the tensor's
            max |v|, one small MAX-allreduce per step for all tensors), "local" (this
            rank's max, no traffic, biased on heterogeneous data) or a float (fixed;
            coordinates beyond it are clamped, counted in ``stats["clamped"]``).
        schedule: "allgather", "sharded" or "allreduce" (see ``signcomm.vote``).
        transport: "mpi", "horovod", a ``Transport``, or None (Horovod when initialised,
            else MPI).
        weight_decay: decoupled, applied with the vote: x <- x - lr*wd*x - lr*o.
        seed: key of every random stream (S_R noise per rank, shared tie coins and S_1).
        tie: "coin" (default) or "zero" for a tied v1 vote under even n.
        contribution: "sr" (S_R of the momentum, MVSM) or "sign" (sign of the momentum:
            signSGD-MV / Signum-MV; an exact 0 becomes a fair coin of the rank's stream).
        momentum_init: "first" (v_1 = g_1, eq. 9) or "zero" (v_0 = 0, so v_1 = beta g_1,
            Bernstein's Signum and Sun et al.'s convention).
        byzantine: this rank sends the opposite of its bits (a faulty worker).
        bucket_elements: coordinates per fusion bucket (one vote per bucket).
        lockstep_every: every k steps compare a checksum of the parameters across ranks
            and raise ``LockstepError`` naming the step if they differ (0 = never).
        overlap: start each bucket's vote during backward, as soon as its gradients are
            ready, on a worker thread (``signcomm.optim.overlap``); same results.

    After each ``step()``, ``self.stats`` holds this rank's figures for the step:
    ``compress_s`` (momentum + R + packing), ``comm_s`` (time inside collectives),
    ``vote_s`` (the vote kernels), ``update_s``, ``bytes_sent``, ``bytes_received`` and
    ``clamped``.  ``self.transport.ledger`` has every call.
    """

    def __init__(self, params, lr, beta: float = 0.5, variant: str = "v1", R="global",
                 schedule: str = "allgather", transport=None, weight_decay: float = 0.0,
                 seed: int = 0, tie: str = "coin", *, contribution: str = "sr",
                 momentum_init: str = "first", byzantine: bool = False,
                 bucket_elements: int = DEFAULT_BUCKET_ELEMENTS, lockstep_every: int = 0,
                 overlap: bool = False):
        check_lr(lr)
        check_beta(beta)
        if variant not in K.VARIANTS:
            raise ValueError(f"variant must be one of {K.VARIANTS}, got {variant!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if contribution not in CONTRIBUTIONS:
            raise ValueError(f"contribution must be one of {CONTRIBUTIONS}, got {contribution!r}")
        if momentum_init not in MOMENTUM_INITS:
            raise ValueError(f"momentum_init must be one of {MOMENTUM_INITS}, got {momentum_init!r}")
        if not (R in R_POLICIES or (isinstance(R, (int, float)) and not isinstance(R, bool))):
            raise ValueError(f"R must be 'global', 'local' or a positive float, got {R!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not (isinstance(transport, (str, Transport)) or transport is None):
            raise ValueError(f"transport must be 'mpi', 'horovod', a Transport or None, got {transport!r}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.transport = get_transport(transport)
        self.variant, self.schedule_name, self.tie = variant, schedule, tie
        self.contribution, self.momentum_init, self.seed = contribution, momentum_init, int(seed)
        self.R = R
        self.bucket_elements = int(bucket_elements)
        self.lockstep_every = int(lockstep_every)
        self.signvote = SignVote(self.transport, schedule=schedule, variant=variant, tie=tie,
                                 seed=seed, R=R if contribution == "sr" else None,
                                 invert=byzantine)
        self._step = 0
        self._layouts = {}
        self._buffers = {}  # reused flat float32 buffer (vote values, non-fp32 parameters)
        self._mom = None     # _Momenta of the current layout
        self.stats = {}
        self._overlap = None
        if overlap:
            from .overlap import OverlapEngine
            self._overlap = OverlapEngine(self)

    def close(self):
        """Remove the overlap hooks and stop the overlap thread (nothing to do without
        ``overlap=True``).  Dropping the optimizer does the same; after ``close()`` steps
        run synchronously."""
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None

    def add_param_group(self, param_group):
        """torch's, plus the checks of lr, beta and weight decay for the group's own values."""
        check_group(param_group, self.defaults)
        super().add_param_group(param_group)

    # -- helpers ----------------------------------------------------------------------
    def _present(self, require_grad=True):
        """(group, param, name) of every parameter with a gradient (or, with
        ``require_grad=False``, every parameter that requires one), in a fixed order."""
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if (p.grad is not None) if require_grad else p.requires_grad:
                    name = names[i] if names else f"param_groups[{gi}]['params'][{i}] {tuple(p.shape)}"
                    out.append((group, p, name))
        return out

    def _layout(self, present):
        key = tuple(id(p) for _, p, _ in present)
        if key not in self._layouts:
            self._layouts = {key: plan_buckets([p for _, p, _ in present], self.bucket_elements)}
        return self._layouts[key]

    def _momenta(self, buckets):
        """The double-buffered momentum of this layout (made anew when the layout changes;
        momentum from elsewhere, e.g. ``load_state_dict``, is copied in at the next step)."""
        key = tuple(id(p) for b in buckets for p in b.params)
        if self._mom is None or self._mom.key != key:
            self._mom = _Momenta(key, buckets)
        return self._mom

    def _stateless(self, group):
        """No momentum (beta = 1 with v_1 = g_1): v_t = g_t, nothing stored."""
        return group["beta"] == 1.0 and self.momentum_init == "first"

    def _prepare(self, mom, bi, entries):
        """One pass per parameter of bucket ``bi``: v_t (eq. 9) into the bucket's next
        momentum buffer, max |g| (the finite check) and max |v_t| (R's local max), fused.
        The state is not touched (``_commit`` does that after the vote).  Returns (the
        bucket's v_t as a flat fp32 array, max |v_t| per tensor as float64, names of the
        parameters whose gradient is not finite)."""
        cur = mom.cur[bi]
        nxt = 1 - cur
        fused = _fused_lerp_ok()
        vmax = np.zeros(len(entries), np.float64)
        bad = []
        for j, (group, p, name) in enumerate(entries):
            g = p.grad.detach()
            if g.is_sparse:
                raise TypeError("sparse gradients are not supported")
            if g.dtype != torch.float32 or not g.is_contiguous():
                g = g.float().contiguous()
            beta = group["beta"]
            out_t = mom.views[bi][nxt][j]
            v_t = None
            if self._stateless(group):
                mode = _step.MODE_COPY
            else:
                v = self.state[p].get("momentum_buffer")
                if v is None:
                    mode = _step.MODE_COPY if self.momentum_init == "first" else _step.MODE_SCALE
                else:
                    v_t = mom.views[bi][cur][j]
                    if v is not v_t:  # loaded or set from outside: take its values
                        v_t.reshape(-1).copy_(v.detach().reshape(-1))
                    mode = _step.MODE_LERP
            if fused or mode != _step.MODE_LERP:
                gm, vm = _step.momentum_pass(mom.arrays[bi][cur][j], g.numpy().reshape(-1),
                                             mom.arrays[bi][nxt][j], beta, mode)
                finite, vmax[j] = gm < NONFINITE_BITS, _bits_to_float(vm)
            else:  # torch's lerp rounds otherwise on this machine: use it
                torch.lerp(v_t, g.view_as(v_t), beta, out=out_t)
                finite = bool(torch.isfinite(_max_abs([g])[0]))
                vmax[j] = float(_max_abs([out_t])[0])
            if not finite:
                bad.append(name)
        return mom.flat[bi][nxt].numpy(), vmax, bad

    def _commit(self, mom, bi, entries):
        """v_t of bucket ``bi`` becomes the momentum (after a successful vote)."""
        nxt = 1 - mom.cur[bi]
        for j, (group, p, _) in enumerate(entries):
            if not self._stateless(group):
                self.state[p]["momentum_buffer"] = mom.views[bi][nxt][j]
        mom.cur[bi] = nxt

    def _agree(self, step, present, what, bad):
        """One small allreduce: same layout and settings on every rank, finite grads
        (``bad``: this rank's parameters with a non-finite gradient, from ``_prepare``)."""
        error = (f"non-finite gradient (NaN/Inf) in {', '.join(bad[:5])}"
                 f"{' and more' if len(bad) > 5 else ''} at step {step}; nothing was updated") if bad else None
        self.transport.agree(
            (step, tuple((tuple(p.shape), str(p.dtype)) for _, p, _ in present), self.schedule_name,
             self.variant, self.tie, self.contribution, str(self.R), self.seed),
            error=error, what=f"{what} of optimizer step {step} (parameter layout and gradients)")

    def _vote_bucket(self, step, bucket, flat, r):
        """Pack one bucket's contributions (S_R with per-tensor ``r``, or sign when
        ``r`` is None) from its flat momentum and vote; returns (Vote, clamped,
        compress_s, vote_s), vote_s without the time inside collectives (that is comm_s)."""
        t1 = time.perf_counter()
        packed = self.signvote.contribute(flat, step, r=r, seg_sizes=bucket.sizes, offset=bucket.offset)
        ledger = self.transport.ledger
        t2, comm0 = time.perf_counter(), ledger.summary().seconds
        vote = self.signvote.schedule.vote(packed, bucket.d, step, bucket.offset)
        vote_s = time.perf_counter() - t2 - (ledger.summary().seconds - comm0)  # kernels only
        return vote, self.signvote.last_clamped, t2 - t1, vote_s

    def _values(self, vote, d):
        """The vote as float32 +1/-1 (0 on ties under tie="zero"), decoded into a reused
        buffer (the same values as ``vote.values``, without three fresh d-sized arrays)."""
        if vote.nonzero is not None:
            return vote.values(d, np.float32)
        buf = self._buffers.get("values")
        if buf is None or buf.shape[0] < d:
            buf = self._buffers["values"] = np.empty(d, np.float32)
        o = buf[:d]
        np.multiply(np.unpackbits(vote.bits, bitorder=K.BITORDER, count=d), np.float32(2), out=o,
                    dtype=np.float32)
        return np.subtract(o, np.float32(1), out=o)

    def _resolve_r(self, local):
        """Per-tensor R under the R policy from this rank's max |v| per tensor (None for
        sign methods); "global" costs one MAX-allreduce for all of them."""
        if self.contribution != "sr":
            return None
        return self.signvote.resolve_r(local)

    def _update(self, present, buckets, votes):
        """x <- x (1 - lr wd) - lr o for every parameter, o read from the packed vote
        bits (fp32 CPU parameters, one numba pass each) or decoded into floats (others:
        torch's fp16/bf16 arithmetic)."""
        first = 0
        for b, vote in zip(buckets, votes):
            o = None
            start = 0
            for p, size in zip(b.params, b.sizes.tolist()):
                group = present[first][0]
                first += 1
                lr, wd = group["lr"], group["weight_decay"]
                if p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous():
                    # p.mul_(1 - lr wd); p.add_(o, alpha=-lr), with the same roundings
                    _step.apply_signs(p.detach().numpy().reshape(-1), vote.bits, start,
                                      np.float32(-lr), nonzero=vote.nonzero,
                                      decay=(1 - lr * wd) if wd else None)
                else:
                    if o is None:
                        o = torch.from_numpy(self._values(vote, b.d))
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(o[start:start + size].view_as(p).to(p.dtype), alpha=-lr)
                start += size

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        step = self._step
        ledger = self.transport.ledger
        ledger.begin_step(step)
        present = self._present()
        overlapped = self._overlap is not None and self._overlap.matches(present)
        if overlapped:  # buckets were voted during backward; finish the rest in order
            votes, clamped, compress_s, vote_total = self._overlap.finish(step)
            buckets = self._overlap.buckets
        else:
            if self._overlap is not None:
                self._overlap.reset()
            buckets = self._layout(present) if present else []
            mom = self._momenta(buckets) if buckets else None
            prepared, bad, first = [], [], 0
            for bi, b in enumerate(buckets):  # local: v_t, finite check, max |v_t|
                entries = present[first:first + len(b.params)]
                flat, vmax, bad_b = self._prepare(mom, bi, entries)
                prepared.append((entries, flat, vmax))
                bad += bad_b
                first += len(b.params)
            self._agree(step, present, "the vote", bad)
            if not present:
                self._step += 1
                return loss
            r_all = self._resolve_r(np.concatenate([vm for _, _, vm in prepared]))
            # the agreement and shared-R collectives so far count as comm_s, not compress_s
            compress_s = time.perf_counter() - t0 - ledger.summary(step).seconds
            vote_total, clamped, first, votes = 0.0, 0, 0, []
            for b, (entries, flat, _) in zip(buckets, prepared):
                k = len(b.params)
                r = None if r_all is None else r_all[first:first + k]
                vote, c, cs, vt = self._vote_bucket(step, b, flat, r)
                votes.append(vote)
                clamped, compress_s, vote_total = clamped + c, compress_s + cs, vote_total + vt
                first += k
            for bi, (entries, _, _) in enumerate(prepared):  # every vote succeeded
                self._commit(mom, bi, entries)
        t3 = time.perf_counter()
        self._update(present, buckets, votes)
        update_s = time.perf_counter() - t3
        self._step += 1
        if self.lockstep_every and self._step % self.lockstep_every == 0:
            check_lockstep([p for _, p, _ in present], self.transport, step)
        summary = ledger.summary(step)
        comm_s = summary.seconds
        self.stats = dict(step=step, compress_s=compress_s, comm_s=comm_s,
                          vote_s=max(vote_total, 0.0), update_s=update_s,
                          bytes_sent=summary.bytes_sent, bytes_received=summary.bytes_received,
                          clamped=clamped)
        return loss

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """Torch's state dict plus ``signcomm``: step counter (= the position of every
        random stream, which are counter-based), seed, rank and number of ranks.
        Momentum is this rank's own: save one file per rank."""
        sd = super().state_dict()
        sd["signcomm"] = dict(step=self._step, seed=self.seed, rank=self.transport.rank,
                              size=self.transport.size, variant=self.variant)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        meta = state_dict.pop("signcomm", None)
        # torch casts floating state to each parameter's dtype on load, which would round
        # an fp16/bf16 parameter's fp32 momentum: keep the saved fp32 tensors instead
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        momenta = {i: state_dict["state"][i]["momentum_buffer"] for i in saved_ids
                   if "momentum_buffer" in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in momenta:
                self.state[p]["momentum_buffer"] = momenta[i].to(device=p.device, dtype=torch.float32,
                                                                 copy=True)
        if meta is not None:
            self._step = int(meta["step"])
            if int(meta["seed"]) != self.seed:
                warnings.warn(f"checkpoint seed {meta['seed']} differs from this optimizer's "
                              f"seed {self.seed}; keeping {self.seed}")
            if int(meta["size"]) != self.transport.size:
                warnings.warn(
                    f"checkpoint was written by {meta['size']} ranks, resuming on "
                    f"{self.transport.size}: momentum is per rank, so this rank continues "
                    f"from the momentum in the file it loaded (rank {meta['rank']}'s); the run "
                    "is a valid MVSM run but not bit-identical to one that never stopped")
            elif int(meta["rank"]) != self.transport.rank:
                warnings.warn(
                    f"rank {self.transport.rank} loaded rank {meta['rank']}'s checkpoint: momentum "
                    "is per rank, so the run goes on validly but not bit-identical to one that "
                    "never stopped (load the file this rank wrote)")
