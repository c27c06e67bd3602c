"""The bucket engine: one rank's side of an MVSM step, for every face.

For each fusion bucket (a flat buffer whose segments are tensors) and step t:

1. ``prepare``: v_t (eq. 9) into the bucket's spare momentum buffer, fused with the
   finite check of the gradient and each segment's max |v_t| (R's local max);
2. ``start_control``: one small non-blocking MAX-allreduce that checks every rank has
   the same layout, device and settings and finite gradients, and carries the maxima
   for a shared R (``RankMismatchError``/``RemoteRankError`` on every rank otherwise);
   the synchronous step makes one for all buckets, the overlapped step one per bucket;
3. ``start``: the contribution (S_R of eq. 8 with the per-tensor R, or sign), packed,
   and the vote schedule's first collective posted, non-blocking (``VoteHandle``);
   ``VoteHandle.finish`` waits and votes (eq. 10 / 11);
4. ``commit``: v_t becomes the momentum (only once every vote of the step succeeded,
   so a failed step changes nothing);
5. ``apply``: x <- x (1 - lr wd) - lr o straight from the packed vote bits.

The engine owns what the step keeps per rank: the momentum (two flat fp32 buffers per
bucket, on the parameters' device) and the step counter (the position of every
counter-based random stream), with ``state_dict``/``load_state_dict``.  It runs the
kernels of one backend per device (``signcomm.backends``): numba for CPU tensors, torch
ops for CUDA ones by default.  ``MVSM`` (synchronous and overlapped) drives it; so can
any other face, through these public methods only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends import NONFINITE_BITS, BackendError, bits_to_float, get_backend
from .contribution import Contribution, RPolicy
from .kernels import _step
from .kernels.rules import VoteRule
from .buckets import plan_buckets
from .hierarchy import shard_bucket, shard_span
from .vote import VoteHandle, make_schedule

MOMENTUM_INITS = ("first", "zero")
MODE_LERP, MODE_COPY, MODE_SCALE = _step.MODE_LERP, _step.MODE_COPY, _step.MODE_SCALE


def _mean_name(bi):
    """The name of bucket ``bi``'s machine-mean exchange (the same on every rank)."""
    return f"signcomm.b{bi}.mean"


class Layout:
    """The buckets of one list of parameters and their momentum: two flat fp32 buffers
    per bucket on the parameters' device (side ``cur[b]`` holds v_{t-1}; step t writes
    v_t into the other side, which becomes ``cur`` at ``commit``).

    ``whole[b]`` is bucket b; ``buckets[b]`` the part of it this rank votes on: the whole
    bucket in a flat vote, shard i of k in the hierarchical vote (``shard=(k, i)``), whose
    momentum is the shard's only (per-parameter views are then flat: a parameter's share
    of the shard, maybe empty).  The hierarchical layout also holds, per bucket, the
    gradients to send (``staging(b)``: k shards of ``spans[b]`` coordinates, made on first
    use and released once the machine's transport offers its own send buffer,
    ``Hierarchy.send_buffer``) and the machine's mean of this rank's shard (``mean``)."""

    def __init__(self, params, bucket_elements=None, *, buckets=None, shard=None):
        """Buckets planned greedily from ``params`` (``bucket_elements`` coordinates at
        most, positions numbered from 0 in order), or the given ``buckets`` (a face
        whose buckets are decided elsewhere, e.g. DDP's: each ``Bucket(params, sizes,
        offset)`` holds parameters whose coordinates are the contiguous positions
        offset .. offset + d - 1)."""
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise BackendError(f"parameters on several devices ({', '.join(sorted(map(str, devices)))}) "
                               "in one optimizer: put the model on one device (one MVSM per device)")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.params = list(params)
        self.key = tuple(id(p) for p in self.params)
        self.whole = buckets if buckets is not None else plan_buckets(self.params, bucket_elements)
        self.buckets, self.spans, self.staged, self.mean = self.whole, None, None, None
        if shard is not None:
            k, i = shard
            self.shards = k
            self.buckets = [shard_bucket(b, k, i) for b in self.whole]
            self.spans = [shard_span(b.d, k) for b in self.whole]
            self.staged = [None] * len(self.spans)
            self.mean = [torch.zeros(s, dtype=torch.float32, device=self.device)
                         for s in self.spans]
        self.flat, self.views, self.cur = [], [], [0] * len(self.buckets)
        for b in self.buckets:
            pair = [torch.empty(b.d, dtype=torch.float32, device=self.device) for _ in range(2)]
            starts = np.concatenate([[0], np.cumsum(b.sizes)]).astype(np.int64).tolist()
            self.flat.append(pair)
            self.views.append([[side[starts[j]:starts[j + 1]] if shard is not None else
                                side[starts[j]:starts[j + 1]].view(p.shape)
                                for j, p in enumerate(b.params)] for side in pair])

    def staging(self, bi):
        """Bucket ``bi``'s own send buffer of the hierarchical vote (k * ``spans[bi]``
        fp32), made on first use."""
        if self.staged[bi] is None:
            self.staged[bi] = torch.zeros(self.shards * self.spans[bi], dtype=torch.float32,
                                          device=self.device)
        return self.staged[bi]

    def release_staging(self, bi):
        """Drop bucket ``bi``'s own send buffer (the machine's transport serves it now)."""
        self.staged[bi] = None

    def momentum(self, bi, j):
        """v_{t-1} of parameter j of bucket bi (a view of the current side)."""
        return self.views[bi][self.cur[bi]][j]

    def written(self, bi, j):
        """v_t of parameter j of bucket bi after ``prepare`` (the spare side)."""
        return self.views[bi][1 - self.cur[bi]][j]


@dataclass
class Prepared:
    """One bucket after ``prepare``: v_t (native array of the backend), each segment's
    max |v_t|, the names of parameters whose gradient is not finite, the time spent."""

    bi: int
    v: object
    vmax: np.ndarray
    bad: list
    seconds: float
    error: str | None = None
    handle: object = field(default=None, repr=False)
    clamped: int = 0


class VoteEngine:
    """One rank's engine (see the module docstring).

    Args: ``transport``; ``rule`` (a ``VoteRule``); ``schedule`` name; ``seed``;
    ``contribution`` ("sr" or "sign"); ``R`` (policy, for "sr"); ``momentum_init``
    ("first": v_1 = g_1, eq. 9; "zero": v_0 = 0); ``invert`` (a Byzantine rank);
    ``backend`` ("auto", "numba", "torch" or a Backend); ``bucket_elements``;
    ``hierarchy`` (a ``signcomm.hierarchy.Hierarchy``: the hierarchical vote, whose
    machines vote as the nodes, each rank on its shard, keyed as its machine; None: flat).

    The hierarchical step adds, before ``prepare``: ``stage`` (each bucket's gradients
    into its send buffer, with their finite check), ``start_control`` on the staged
    buckets (agreement, finite gradients), ``reduce`` (the machine mean of this rank's
    shard) and ``mean_segments`` (what ``prepare`` takes as the gradients)."""

    def __init__(self, transport, *, rule: VoteRule, schedule: str = "allgather", seed: int = 0,
                 contribution: str = "sr", R="global", momentum_init: str = "first",
                 invert: bool = False, backend="auto", bucket_elements: int = 1 << 22,
                 hierarchy=None):
        if momentum_init not in MOMENTUM_INITS:
            raise ValueError(f"momentum_init must be one of {MOMENTUM_INITS}, got {momentum_init!r}")
        self.transport = transport
        self.rule = rule
        self.hierarchy = hierarchy
        voters = transport if hierarchy is None else hierarchy.cross  # rank: the node's index
        self.schedule = make_schedule(schedule, voters, rule=rule, seed=seed)
        self.contribution = Contribution(contribution, seed=seed, rank=voters.rank,
                                         invert=invert)
        self.policy = RPolicy(R if contribution == "sr" else None)
        self.momentum_init = momentum_init
        self.backend_spec = backend
        if not isinstance(backend, str):
            get_backend(backend)
        elif backend not in ("auto", "numba", "torch", "cupy"):
            get_backend(backend)  # raises the clear error
        self.bucket_elements = int(bucket_elements)
        self.step = 0
        self.layout = None

    # -- layout, backend -----------------------------------------------------------------
    @property
    def shard(self):
        """(k, local rank) under the hierarchical vote (``Layout``'s ``shard=``), else None."""
        h = self.hierarchy
        return None if h is None else (h.k, h.local_rank)

    def layout_for(self, params) -> Layout:
        """The layout of ``params`` (kept while the same parameters come back; a new one
        starts with the momentum of ``prepare``'s ``prev`` arguments)."""
        key = tuple(id(p) for p in params)
        if self.layout is None or self.layout.key != key:
            self.layout = Layout(params, self.bucket_elements, shard=self.shard)
        return self.layout

    def backend(self, device):
        return get_backend(self.backend_spec, device)

    def signature(self, layout: Layout):
        """What every rank must share for the step to be one vote."""
        try:
            backend = self.backend(layout.device).name
        except BackendError:  # prepare() reports it; the signature still has to be sent
            backend = str(self.backend_spec)
        sig = {"device": layout.device.type, "backend": backend,
               "schedule": self.schedule.name, "variant": self.rule.variant,
               "tie": self.rule.tie, "contribution": self.contribution.kind,
               "R": str(self.policy.R), "seed": self.contribution.seed,
               "momentum_init": self.momentum_init, "bucket_elements": self.bucket_elements}
        if self.hierarchy is not None:
            sig["hierarchy"] = tuple(self.hierarchy.describe().items())
        return sig

    # -- 1. local work -------------------------------------------------------------------
    def prepare(self, layout: Layout, bi: int, grads, betas, prev, names) -> Prepared:
        """v_t of bucket ``bi`` into its spare momentum buffer.  Per parameter j:
        ``grads[j]`` its gradient, ``betas[j]`` the weight of the new gradient (1 with
        ``prev[j] is None`` and momentum_init "first": v_t = g_t), ``prev[j]`` v_{t-1}
        (None on the first step; a tensor from elsewhere, e.g. a checkpoint, is copied
        in).  Errors a rank finds here are returned in ``error`` so that the control
        collective raises them on every rank."""
        t0 = time.perf_counter()
        b = layout.buckets[bi]
        vmax = np.zeros(len(b.params), np.float64)
        bad, error = [], None
        try:
            backend = self.backend(layout.device)
            for j, g in enumerate(grads):
                out = layout.written(bi, j)
                v = None
                if prev[j] is None:
                    mode = MODE_COPY if (self.momentum_init == "first" or betas[j] == 1.0) \
                        else MODE_SCALE
                else:
                    v = layout.momentum(bi, j)
                    if prev[j] is not v:  # loaded or set from outside: take its values
                        if prev[j].numel() != v.numel():
                            raise ValueError(f"the momentum given for {names[j]} has "
                                             f"{prev[j].numel()} values, this rank keeps "
                                             f"{v.numel()}")
                        v.reshape(-1).copy_(prev[j].detach().reshape(-1))
                    mode = MODE_LERP
                vmax[j] = self._momentum(backend, layout, g, names[j], v, out, betas[j], mode, bad)
            flat = backend.from_torch(layout.flat[bi][1 - layout.cur[bi]])
        except (BackendError, TypeError, ValueError) as exc:
            error, flat = f"{type(exc).__name__}: {exc}", None
        return Prepared(bi, flat, vmax, bad, time.perf_counter() - t0, error)

    @staticmethod
    def _momentum(backend, layout, g, name, v, out, beta, mode, bad):
        """eq. (9) of one tensor into ``out`` (``mode``: lerp, copy or scale), fused with
        the finite check of ``g`` (``name`` joins ``bad``) and max |v_t| (returned)."""
        if g.is_sparse:
            raise TypeError("sparse gradients are not supported")
        if g.device != layout.device:
            raise BackendError(f"gradient of {name} is on {g.device}, its parameter "
                               f"on {layout.device}")
        if g.dtype != torch.float32 or not g.is_contiguous():
            g = g.float().contiguous()
        gm, vm = backend.momentum(None if v is None else v.reshape(-1), g.reshape(-1),
                                  out.reshape(-1), beta, mode)
        if gm >= NONFINITE_BITS:
            bad.append(name)
        elif vm >= NONFINITE_BITS:  # finite g, but v_t overflowed fp32
            bad.append(f"{name} (its momentum overflowed fp32: |g| near 3.4e38)")
        return bits_to_float(vm) if vm < NONFINITE_BITS else 0.0

    # -- 0. the hierarchical vote: the machine's mean gradient ------------------------------
    def stage(self, layout: Layout, bi: int, grads, names) -> Prepared:
        """Copy bucket ``bi``'s gradients (``grads[j]`` of parameter j) into its send
        buffer (the returned ``Prepared``'s ``v``: ``layout.staging(bi)``, or the machine
        transport's own buffer, ``Hierarchy.send_buffer``), fused with their finite
        check; ``start_control`` on the staged buckets then agrees and raises any error
        on every rank before anything is sent."""
        t0 = time.perf_counter()
        bad, error = [], None
        send = self.hierarchy.send_buffer(layout, bi, name=_mean_name(bi))
        try:
            backend = self.backend(layout.device)
            start = 0
            for j, (g, size) in enumerate(zip(grads, layout.whole[bi].sizes.tolist())):
                self._momentum(backend, layout, g, names[j], None,
                               send[start:start + size], 1.0, MODE_COPY, bad)
                start += size
        except (BackendError, TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Prepared(bi, send, np.zeros(len(layout.whole[bi].params), np.float64), bad,
                        time.perf_counter() - t0, error)

    def reduce(self, layout: Layout, staged):
        """The machine's mean gradient of this rank's shard of each staged bucket (one
        alltoall each inside the machine, all posted before the first is waited for)."""
        t0 = time.perf_counter()
        handles = [self.hierarchy.start_mean(p.v, layout.spans[p.bi], name=_mean_name(p.bi))
                   for p in staged]
        for p, handle in zip(staged, handles):
            self.hierarchy.finish_mean(handle, layout.mean[p.bi])
        return time.perf_counter() - t0

    def mean_segments(self, layout: Layout, bi: int):
        """The machine mean of this rank's shard of bucket ``bi``, one flat tensor per
        parameter (its share of the shard, maybe empty): ``prepare``'s gradients."""
        sizes = layout.buckets[bi].sizes.tolist()
        return list(layout.mean[bi][:sum(sizes)].split(sizes))

    # -- 2. control ----------------------------------------------------------------------
    def start_control(self, layout: Layout, prepared, signature, what, *, name=None,
                      capacity=None):
        """Post the agreement (and shared-R maxima) of ``prepared`` buckets: one
        non-blocking MAX-allreduce on channel 0.  ``wait()`` returns the maxima.

        ``capacity``: a number of values every rank knows alike (``MVSM.control_capacity``),
        at least the number of segments here: the values (a shared R's maxima, zeros
        without one) are sent zero-padded to that length, so ranks that disagree on the
        layout (a parameter with a gradient on one rank only) or on the R policy or
        contribution still post allreduces of one length and get ``RankMismatchError``
        on every rank."""
        bad = [n for p in prepared for n in p.bad]
        errors = [p.error for p in prepared if p.error]
        error = errors[0] if errors else None
        if bad and error is None:
            error = (f"non-finite gradient (NaN/Inf) in {', '.join(bad[:5])}"
                     f"{' and more' if len(bad) > 5 else ''} at step {self.step}; nothing was updated")
        sig = dict(signature, **self.signature(layout))
        return self.transport.start_agree(sig, error=error, what=what,
                                          values=self.control_values(prepared, capacity),
                                          channel=0, name=name)

    def control_values(self, prepared, capacity=None):
        """What the control carries: with a shared R, each segment's max |v_t| of the
        ``prepared`` buckets (a rank with no bucket passes ``[]``), else nothing; given
        a ``capacity``, always that many values (zero-padded), else None for nothing."""
        if not self.policy.shared and capacity is None:
            return None
        values = np.concatenate([np.zeros(0)] + ([p.vmax for p in prepared]
                                                 if self.policy.shared else []))
        if capacity is None:
            return values
        if values.shape[0] > capacity:
            raise ValueError(f"{values.shape[0]} control values exceed the capacity {capacity}")
        return np.concatenate([values, np.zeros(int(capacity) - values.shape[0])])

    def resolve_r(self, prepared, maxima):
        """Per-prepared-bucket R arrays (None for sign contributions)."""
        own = [p.vmax for p in prepared]
        if self.hierarchy is not None and self.policy.R == "local" and own:
            # the node is the machine: its own max is the max over its ranks' shards
            top = self.hierarchy.machine_max(np.concatenate(own))
            own = np.split(top, np.cumsum([v.shape[0] for v in own])[:-1])
        out, first = [], 0
        for p, mine in zip(prepared, own):
            k = p.vmax.shape[0]
            top = None if maxima is None or not self.policy.shared else maxima[first:first + k]
            out.append(self.policy.resolve(mine, top, transport=self.transport))
            first += k
        return out

    # -- 3. contribution and vote ----------------------------------------------------------
    def start(self, layout: Layout, p: Prepared, r, *, name=None):
        """Pack this rank's bits of bucket ``p.bi`` and post its vote (a VoteHandle)."""
        b = layout.buckets[p.bi]
        backend = self.backend(layout.device)
        t0 = time.perf_counter()
        packed, p.clamped = self.contribution.pack(backend, p.v, self.step, r=r,
                                                   seg_sizes=b.sizes, offset=b.offset)
        p.seconds += time.perf_counter() - t0
        name = name or f"signcomm.b{p.bi}"
        if self.hierarchy is None:
            p.handle = self.schedule.start(packed, b.d, self.step, b.offset, backend=backend,
                                           name=name)
        else:  # the machines' vote of this shard, then the whole vote inside the machine
            p.handle = VoteHandle(self.hierarchy.rounds(
                self.schedule, packed, b.d, layout.whole[p.bi].d, layout.spans[p.bi], self.step,
                b.offset, backend=backend, name=name))
        return p.handle

    # -- 4. commit, 5. apply --------------------------------------------------------------
    def commit(self, layout: Layout, bi: int):
        """v_t of bucket ``bi`` becomes the momentum (after every vote succeeded)."""
        layout.cur[bi] = 1 - layout.cur[bi]

    def apply(self, layout: Layout, bi: int, vote, lrs, wds):
        """x <- x (1 - lr wd) - lr o for every parameter of bucket ``bi`` (``lrs[j]``,
        ``wds[j]`` its group's lr and weight decay)."""
        backend = self.backend(layout.device)
        start = 0
        for j, (p, size) in enumerate(zip(layout.whole[bi].params,
                                          layout.whole[bi].sizes.tolist())):
            x = p.detach()
            if x.is_contiguous():
                backend.apply(x.view(-1), vote, start, lrs[j], wds[j])
            else:
                flat = x.contiguous().view(-1)
                backend.apply(flat, vote, start, lrs[j], wds[j])
                x.copy_(flat.view_as(x))
            start += size

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        """The step counter and, per bucket, the current momentum (flat fp32)."""
        lay = self.layout
        return dict(step=self.step,
                    momentum=[] if lay is None else [lay.flat[i][lay.cur[i]].clone()
                                                     for i in range(len(lay.buckets))])

    def load_state_dict(self, state):
        self.step = int(state["step"])
        if self.layout is not None and state.get("momentum"):
            for i, m in enumerate(state["momentum"]):
                self.layout.flat[i][self.layout.cur[i]].copy_(m)
