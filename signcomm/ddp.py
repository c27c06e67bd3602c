"""MVSM (and the whole majority-vote family) as a DDP communication hook.

    ddp = DistributedDataParallel(model)
    state = signcomm.ddp.register(ddp, "mvsm-v1", seed=0)        # the hook and its state
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)              # x <- x - lr * o

Each rank keeps its momentum in the hook's state; for every DDP bucket the hook sends
one bit per coordinate and returns the vote ``o`` (+1 / -1, 0 for a tie under
``tie="zero"``) in the bucket's dtype, which DDP writes into ``.grad``; a plain
``SGD(lr)`` then moves every coordinate by ``lr``.  With the same seed, method and
options, ``DDP + hook + SGD(lr)`` gives bit-identical parameters to
``signcomm.create_optimizer(method, model.parameters(), lr, ...)`` on the same data
(weight decay 0): both drive the same ``signcomm.engine.VoteEngine``, and the hook
gives every coordinate the random-stream position the optimizer gives it.

What real DDP imposes, and how the hook meets it (details in docs/ddp.md):

- DDP's buckets are not the optimizer's (reversed order, rebuilt after the first
  iteration in gradient-ready order, so one DDP bucket may hold parameters that are
  not neighbours).  Momentum and positions are keyed by **parameter** (its index in
  ``ddp_model.module.parameters()``): a coordinate's position is its index in the flat
  layout of the parameters that have a gradient this step, in that order, as in the
  optimizer.  Each DDP bucket becomes an engine ``Layout`` with one engine ``Bucket``
  per run of neighbouring positions; R is per tensor and shared over ranks.
- One step counter per iteration (it advances in the last bucket's hook), so
  ``no_sync()`` accumulation works: the hook runs on the synchronising backward only.
- Non-blocking: with ``find_unused_parameters=False`` (DDP's default) every
  parameter has a gradient, the positions are known before backward, and each bucket's
  hook posts its control allreduce at once and its vote as soon as the control result
  is in (later hooks test, never wait).  The last bucket's hook waits for every vote,
  commits the momentum and completes every bucket's future (gloo gives Python no
  callback when a collective completes, and every vote must succeed before any
  momentum is committed).  With ``find_unused_parameters=True`` or ``static_graph``
  the set of parameters with a gradient, and so every position, is known only when
  backward has visited every parameter: the votes are then all posted from the last
  bucket's hook, with one control allreduce for the step.
"""
from __future__ import annotations

import inspect
import time
import warnings
import weakref

import numpy as np
import torch
import torch.distributed

from .backends import BackendError
from .buckets import Bucket
from .comm.base import RankMismatchError
from .contribution import KINDS as CONTRIBUTIONS, RPolicy
from .engine import MOMENTUM_INITS, Layout, Prepared, VoteEngine
from .hierarchy import check_options as check_hierarchy, make_hierarchy, piece_ranges
from .kernels.rules import VoteRule
from .optim.common import check_beta
from .optim.majority import MVSM
from .optim.presets import PRESETS, SINGLE_NODE, check_preset_options
from .vote import SCHEDULES

#: The MVSM options that mean something to the hook (the preset lock applies to them).
OPTIONS = ("beta", "variant", "R", "schedule", "seed", "tie", "contribution",
           "momentum_init", "byzantine", "backend", "hierarchy", "ranks_per_node")
_DEFAULTS = {k: v.default for k, v in inspect.signature(MVSM.__init__).parameters.items()
             if k in OPTIONS}
#: MVSM options the hook does not take, and where their job is done instead.
REFUSED = {
    "lr": "the hook returns the vote o; the step size is the optimizer's: "
          "torch.optim.SGD(ddp_model.parameters(), lr=...)",
    "weight_decay": "weight decay is the optimizer's: SGD(..., weight_decay=wd) on the vote "
                    "is x (1 - lr wd) - lr o, MVSM's decoupled rule (docs/ddp.md)",
    "bucket_elements": "DDP decides the buckets (DistributedDataParallel(bucket_cap_mb=...))",
    "overlap": "the hook posts each bucket's vote during backward by itself",
    "lockstep_every": "DDP keeps the replicas in step; compare parameters yourself if needed",
    "transport": "the hook talks through torch.distributed: pass process_group=",
}


def resolve_options(method: str, options: dict) -> tuple:
    """(preset name, the full MVSM options of the hook) for ``method`` and ``options``,
    with the checks of ``create_optimizer`` (unknown names, the preset locks)."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a name, got {method!r}")
    key = method.lower().replace("_", "-")
    if key in SINGLE_NODE:
        raise ValueError(f"method {method!r} is a single-process optimizer; a DDP hook needs a "
                         f"distributed method: {', '.join(PRESETS)}")
    if key not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    for option in options:
        if option in REFUSED:
            raise ValueError(f"signcomm.ddp ({key}): the hook does not take {option}: "
                             f"{REFUSED[option]}")
        if option not in OPTIONS:
            raise TypeError(f"signcomm.ddp ({key}): unknown option {option!r}; the hook takes "
                            f"{', '.join(OPTIONS)}")
    check_preset_options(key, options)
    kwargs = dict(_DEFAULTS)
    kwargs.update({k: v for k, v in PRESETS[key].items() if k in OPTIONS})
    kwargs.update(options)
    check_beta(kwargs["beta"])
    VoteRule(kwargs["variant"], kwargs["tie"])
    if kwargs["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kwargs['schedule']!r}")
    if kwargs["contribution"] not in CONTRIBUTIONS:
        raise ValueError(f"contribution must be one of {CONTRIBUTIONS}, "
                         f"got {kwargs['contribution']!r}")
    if kwargs["momentum_init"] not in MOMENTUM_INITS:
        raise ValueError(f"momentum_init must be one of {MOMENTUM_INITS}, "
                         f"got {kwargs['momentum_init']!r}")
    RPolicy(kwargs["R"])
    check_hierarchy(kwargs["hierarchy"], kwargs["ranks_per_node"])
    kwargs["seed"] = int(kwargs["seed"])
    return key, kwargs


class MVSMHookState:
    """The hook's state: the method and its options, this rank's momentum (per
    parameter, fp32) and the step counter.  Picklable (the process group, transport
    and engine are left out and rebuilt by ``attach``); ``state_dict()`` /
    ``load_state_dict()`` for checkpoints, one per rank (momentum is per rank).

    ``process_group``: the ranks that vote (default: the world; ``register`` passes
    the DDP model's).  ``method``: a member of the family by name, as in
    ``signcomm.create_optimizer`` (``mvsm-v1``, ``mvsm-v2``, ``signsgd-mv``,
    ``signum-mv``, ``sto-signsgd``, ``mv-sto-signsgd-sim``), whose preset lock applies;
    ``options``: ``beta``, ``variant``, ``R``, ``schedule``, ``seed``, ``tie``,
    ``contribution``, ``momentum_init``, ``byzantine``, ``backend`` (as in ``MVSM``).

    After each synchronising backward, ``stats`` holds this rank's figures for the
    step: ``compress_s``, ``comm_s``, ``vote_s``, ``hook_s``, ``bytes_sent``,
    ``bytes_received`` (the transport's ledger, control traffic included); ``buckets``
    the parameter indices of each DDP bucket of that step, in DDP's order."""

    def __init__(self, process_group=None, method: str = "mvsm-v1", **options):
        self.method, self.options = resolve_options(method, options)
        self.process_group = process_group
        self._step = 0
        self.momentum = {}      # parameter index -> v_{t-1} (fp32, on the parameters' device)
        # hierarchical vote: parameter index -> (engine bucket, lo, hi): the momentum is
        # coordinates lo .. hi - 1 of the parameter (this rank's piece of the machine's)
        self.pieces = {}
        self.stats = {}
        self.buckets = ()       # DDP's buckets at the last step (parameter indices, in order)
        self._rt = None

    # -- the step counter (the position of every random stream) ------------------------
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value):
        self._step = int(value)
        if self._rt is not None:
            self._rt.engine.step = self._step

    @property
    def transport(self):
        return None if self._rt is None else self._rt.transport

    @property
    def stateless(self) -> bool:
        """No momentum (beta = 1 with v_1 = g_1): v_t = g_t, nothing stored."""
        return self.options["beta"] == 1.0 and self.options["momentum_init"] == "first"

    # -- attaching to a model ------------------------------------------------------------
    def attach(self, ddp_model):
        """Bind the state to ``ddp_model`` (a ``DistributedDataParallel``): parameter
        order, the transport (collective: every rank calls it at the same point), the
        gradient markers, and one agreement that every rank has the same model and
        options (``RankMismatchError`` on every rank otherwise)."""
        if self._rt is not None:
            self._rt.close()
        self._rt = _Runtime(self, ddp_model)
        return self

    def detach(self):
        """Remove the gradient markers (the momentum and step stay)."""
        if self._rt is not None:
            self._rt.close()
            self._rt = None

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step counter and this rank's momentum per parameter index (fp32 copies), the
        method and its options, this rank and the number of ranks: save one per rank."""
        t = self.transport
        return {"step": self._step,
                "momentum": {i: v.detach().clone() for i, v in sorted(self.momentum.items())},
                "method": self.method, "options": dict(self.options),
                "rank": None if t is None else t.rank, "size": None if t is None else t.size,
                "hierarchy": self.layout_record(),
                "pieces": {i: list(v) for i, v in sorted(self.pieces.items())}}

    @property
    def hierarchy(self):
        """The hierarchical vote's ``Hierarchy`` once attached (None: flat, or detached)."""
        return None if self._rt is None else self._rt.hierarchy

    def layout_record(self):
        """The hierarchical vote's layout once attached (machines, ranks per machine,
        local rank: the momentum is this rank's shards), else None."""
        h = self.hierarchy
        return None if h is None else dict(h.describe(), local_rank=h.local_rank)

    def load_state_dict(self, state: dict):
        """Resume from ``state_dict()``: the next step continues the saved run bit for bit
        (with the same parameters and data)."""
        if state.get("method", self.method) != self.method:
            raise ValueError(f"checkpoint is for {state['method']!r}, this hook runs "
                             f"{self.method!r}")
        saved = state.get("options", {})
        for key in ("hierarchy", "ranks_per_node"):
            if saved.get(key) != self.options[key]:
                raise ValueError(f"checkpoint was written with {key}={saved.get(key)!r}, this "
                                 f"hook has {self.options[key]!r}: under the hierarchical vote a "
                                 "rank keeps its shard of its machine's momentum, so a checkpoint "
                                 "resumes only on the layout that wrote it")
        mine = self.layout_record()
        if mine is not None and state.get("hierarchy") not in (None, mine):
            raise ValueError(f"checkpoint was written by the hierarchical layout "
                             f"{state['hierarchy']}, this rank runs {mine}: load the file this "
                             "rank wrote, on the same machines and ranks per machine")
        for key in ("seed", "variant", "contribution", "momentum_init"):
            if key in saved and saved[key] != self.options[key]:
                warnings.warn(f"checkpoint {key}={saved[key]!r} differs from this hook's "
                              f"{self.options[key]!r}; keeping {self.options[key]!r}")
        t = self.transport
        if t is not None and state.get("size") is not None:
            if int(state["size"]) != t.size:
                warnings.warn(f"checkpoint was written by {state['size']} ranks, resuming on "
                              f"{t.size}: momentum is per rank, so the run goes on validly but "
                              "not bit-identical to one that never stopped")
            elif int(state["rank"]) != t.rank:
                warnings.warn(f"rank {t.rank} loaded rank {state['rank']}'s checkpoint: momentum "
                              "is per rank (load the file this rank wrote)")
        self.step = int(state["step"])
        self.momentum = {int(i): v.detach().to(torch.float32, copy=True)
                         for i, v in state["momentum"].items()}
        self.pieces = {int(i): (tuple(v[0]), int(v[1]), int(v[2]))
                       for i, v in (state.get("pieces") or {}).items()}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["process_group"] = None   # not picklable; the default group after loading
        d["_rt"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    # -- the hook ------------------------------------------------------------------------
    def on_bucket(self, bucket) -> torch.futures.Future:
        rt = self._rt
        if rt is None:
            raise RuntimeError("this MVSMHookState is not attached to a DDP model: use "
                               "signcomm.ddp.register(ddp_model, ...), or state.attach(ddp_model) "
                               "before ddp_model.register_comm_hook(state, signcomm.ddp.hook)")
        return rt.on_bucket(bucket)


def hook(state, bucket):
    """The DDP communication hook: ``ddp_model.register_comm_hook(state, hook)``;
    returns a future of the bucket's vote (``torch.futures.Future[torch.Tensor]``)."""
    return state.on_bucket(bucket)


# real annotation objects (this module's annotations are strings), as DDP checks them
hook.__annotations__ = {"state": MVSMHookState, "bucket": torch.distributed.GradBucket,
                        "return": torch.futures.Future[torch.Tensor]}


def register(ddp_model, method: str = "mvsm-v1", **options) -> MVSMHookState:
    """``state = signcomm.ddp.register(ddp_model, "mvsm-v1", seed=0, ...)``: the state
    (on ``ddp_model``'s process group), attached, and the hook registered; every rank
    calls it at the same point (it makes process groups and one agreement)."""
    state = MVSMHookState(getattr(ddp_model, "process_group", None), method, **options)
    state.attach(ddp_model)
    ddp_model.register_comm_hook(state, hook)
    return state


# ---------------------------------------------------------------------------------------
# what lives only while attached
# ---------------------------------------------------------------------------------------
class _Entry:
    """One DDP bucket of the current iteration."""

    def __init__(self, bucket, idx, future):
        self.index = bucket.index()
        self.buffer = bucket.buffer()
        self.grads = bucket.gradients()
        self.idx = idx              # parameter index of each of the bucket's parameters
        self.future = future
        self.runs = []              # (layout, bi, [parameter indices], Prepared) per engine bucket


class _Group:
    """Buckets prepared together under one control allreduce."""

    def __init__(self, entries):
        self.entries = entries
        self.prepared = []          # (Prepared, layout) of every engine bucket, in order
        self.pad = []              # a zero Prepared that fills the control's values
        self.control = None
        self.started = False
        self.error = None


class _Runtime:
    def __init__(self, state: MVSMHookState, ddp_model):
        from .comm.torchdist import TorchDistTransport
        self._state = weakref.ref(state)
        module = getattr(ddp_model, "module", ddp_model)
        named = list(module.named_parameters())
        self.params = [p for _, p in named]
        self.names = [f"{name} {tuple(p.shape)}" for name, p in named]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.numel = [p.numel() for p in self.params]
        ignored = set(getattr(ddp_model, "parameters_to_ignore", ()) or ())
        self.ddp = [i for i, (name, p) in enumerate(named)
                    if p.requires_grad and name not in ignored]
        self.deferred = bool(getattr(ddp_model, "find_unused_parameters", True)
                             or getattr(ddp_model, "static_graph", False))
        # static positions: every DDP parameter has a gradient (find_unused_parameters=False)
        self.static_offset, off = {}, 0
        for i in self.ddp:
            self.static_offset[i] = off
            off += self.numel[i]
        self.used = np.zeros(len(self.params), bool)
        handles = []
        if self.deferred:
            me = weakref.ref(self)

            def mark(p):
                live = me()
                if live is not None:
                    i = live.index.get(id(p))
                    if i is not None:
                        live.used[i] = True

            handles = [self.params[i].register_post_accumulate_grad_hook(mark) for i in self.ddp]
        self._finalizer = weakref.finalize(self, _remove, handles)
        o = state.options
        self.transport = TorchDistTransport(state.process_group)
        self.hierarchy = make_hierarchy(self.transport, o["hierarchy"], o["ranks_per_node"])
        self.engine = VoteEngine(self.transport, rule=VoteRule(o["variant"], o["tie"]),
                                 schedule=o["schedule"], seed=o["seed"],
                                 contribution=o["contribution"], R=o["R"],
                                 momentum_init=o["momentum_init"], invert=o["byzantine"],
                                 backend=o["backend"], hierarchy=self.hierarchy)
        self.engine.step = state.step
        self.layouts = {}
        self.iteration = None
        signature = {"method": state.method,
                     **{k: repr(v) for k, v in sorted(o.items()) if k != "byzantine"},
                     "parameter shapes and dtypes": tuple((tuple(p.shape), str(p.dtype))
                                                          for p in self.params),
                     "parameters DDP reduces": tuple(self.ddp),
                     "find_unused_parameters or static_graph": self.deferred,
                     "step": state.step}
        self.transport.agree(signature, what="signcomm.ddp: attaching the hook (model and options)")

    def close(self):
        self._finalizer()

    @property
    def state(self) -> MVSMHookState:
        s = self._state()
        if s is None:
            raise RuntimeError("the MVSMHookState of this hook no longer exists")
        return s

    # -- per bucket ----------------------------------------------------------------------
    def on_bucket(self, bucket):
        if self.iteration is None:
            self.iteration = dict(entries=[], groups=[], t0=time.perf_counter(), hook_s=0.0)
            self.transport.ledger.begin_step(self.engine.step)
        it = self.iteration
        t0 = time.perf_counter()
        try:
            idx = [self.index[id(p)] for p in bucket.parameters()]
        except KeyError:
            self.iteration = None
            raise RuntimeError("signcomm.ddp: a DDP bucket holds a parameter of another model "
                               "than the one the state was attached to") from None
        entry = _Entry(bucket, idx, torch.futures.Future())
        it["entries"].append(entry)
        try:
            if not self.deferred:
                self.post([entry])
                self.progress(block=False)
            it["hook_s"] += time.perf_counter() - t0
            if bucket.is_last():
                self.finish()
        except BaseException:
            self.abandon()
            raise
        return entry.future

    def _positions(self):
        """Offset of every parameter with a gradient this step (in parameter order)."""
        if not self.deferred:
            return self.static_offset
        out, off = {}, 0
        for i in self.ddp:
            if self.used[i]:
                out[i] = off
                off += self.numel[i]
        return out

    def layout_for(self, runs):
        """The layout of one DDP bucket's runs ((indices, offset) each), kept while the
        same runs come back (momentum is copied in from the state when it changes)."""
        key = tuple((tuple(ix), off) for ix, off in runs)
        lay = self.layouts.get(key)
        if lay is None:
            buckets = [Bucket([self.params[i] for i in ix],
                              np.array([self.numel[i] for i in ix], np.int64), off)
                       for ix, off in runs]
            lay = Layout([p for b in buckets for p in b.params], buckets=buckets,
                         shard=self.engine.shard)
            self.layouts[key] = lay
        return lay

    def post(self, entries):
        """Prepare the engine buckets of ``entries`` and post their control allreduce."""
        state, engine = self.state, self.engine
        pos = self._positions()
        group = _Group(entries)
        sig_used, sig_shapes, total, error = [], [], 0, None
        layout, runs_of = None, []
        for e in entries:
            total += len(e.idx)
            grad_of = dict(zip(e.idx, e.grads))
            used = sorted(i for i in e.idx if i in pos)
            runs, end = [], None
            for i in used:       # runs of neighbouring positions: one engine bucket each
                if runs and pos[i] == end:
                    runs[-1][0].append(i)
                else:
                    runs.append(([i], pos[i]))
                end = pos[i] + self.numel[i]
            sig_used.append(tuple(used))
            sig_shapes.append(tuple((tuple(self.params[i].shape), str(self.params[i].dtype))
                                    for i in used))
            if not runs or error is not None:
                continue
            try:
                lay = self.layout_for(runs)
            except BackendError as exc:  # e.g. parameters on several devices: on every rank
                error = f"BackendError: {exc}"
                continue
            layout = lay
            for bi, (ix, _) in enumerate(runs):
                runs_of.append((e, lay, bi, ix, [grad_of[i].detach() for i in ix]))
        signature = {"step": engine.step, "DDP buckets": tuple(tuple(e.idx) for e in entries),
                     "parameters with a gradient": tuple(sig_used),
                     "parameter shapes and dtypes": tuple(sig_shapes),
                     "beta": float(state.options["beta"])}
        what = (f"the vote of DDP bucket(s) {', '.join(str(e.index) for e in entries)} at step "
                f"{engine.step} (parameters with a gradient, shapes, settings, gradients)")
        npad = total - sum(len(r[3]) for r in runs_of)
        shared = engine.policy.shared
        name = f"signcomm.ddp.ctrl.b{entries[0].index}"
        means = {}
        if self.hierarchy is not None and layout is not None and error is None:
            means = self.machine_means(runs_of, signature, what, npad if shared else 0, name)
            self.move_pieces(runs_of)
        beta = state.options["beta"]
        for e, lay, bi, ix, grads in runs_of:
            p = engine.prepare(lay, bi, means.get((id(lay), bi), grads), [beta] * len(ix),
                               [None if state.stateless else state.momentum.get(i) for i in ix],
                               [self.names[i] for i in ix])
            group.prepared.append((p, lay, ix))
            e.runs.append((lay, bi, ix, p))
        if layout is None or error is not None:
            # nothing to vote here (or a local error): the agreement still runs, so that
            # every rank raises or goes on alike
            group.prepared = []
            group.control = self.transport.start_agree(
                signature, error=error, what=what, values=np.zeros(total) if shared else None,
                channel=0, name=name)
        else:
            # one value per bucket parameter, with a gradient or not, so every rank's
            # allreduce has the same length even if the ranks disagree on which
            # parameters have one (they then get RankMismatchError)
            group.pad = [Prepared(-1, None, np.zeros(npad), [], 0.0)] if npad and shared else []
            group.control = engine.start_control(layout, [p for p, _, _ in group.prepared]
                                                 + group.pad, signature, what, name=name)
        self.iteration["groups"].append(group)

    def move_pieces(self, runs_of):
        """Under the hierarchy a parameter's momentum is the piece its engine bucket's
        shard holds; when DDP's buckets change, the pieces move inside the machine
        (every rank of the machine sees the same change, in the same order)."""
        state = self.state
        if state.stateless:
            return
        for _, lay, bi, ix, _ in runs_of:
            key = tuple(ix)
            new = piece_ranges(lay.whole[bi], lay.buckets[bi])
            for i, (lo, hi) in zip(ix, new):
                old = state.pieces.get(i)
                if i in state.momentum and old is not None and old[0] != key:
                    state.momentum[i] = self.hierarchy.regather(
                        state.momentum[i], old[1], old[2], self.numel[i], lo, hi)
                    state.pieces[i] = (key, lo, hi)

    def machine_means(self, runs_of, signature, what, npad, name):
        """The hierarchical vote's first half for these engine buckets: stage their
        gradients, agree (an error on every rank before any gradient moves), and the
        machine mean of this rank's shard of each: {(id(layout), bucket): segments}."""
        engine = self.engine
        staged = [(lay, engine.stage(lay, bi, grads, [self.names[i] for i in ix]))
                  for _, lay, bi, ix, grads in runs_of]
        pad = [Prepared(-1, None, np.zeros(npad), [], 0.0)] if npad else []
        engine.start_control(runs_of[0][1], [p for _, p in staged] + pad, signature, what,
                             name=name + ".mean").wait()
        for lay, p in staged:
            engine.reduce(lay, [p])
        return {(id(lay), p.bi): engine.mean_segments(lay, p.bi) for lay, p in staged}

    def progress(self, block: bool):
        """Post what can be posted, each channel in the same order on every rank: a
        group's votes once its control result is in, each vote's next round only after
        the vote before it posted that round; ``block``: everything, to the end."""
        engine = self.engine
        ahead = None
        for g in self.iteration["groups"]:
            if not g.started and g.error is None:
                if not (block or g.control.test()):
                    break
                try:
                    maxima = g.control.wait()
                except Exception as exc:  # noqa: BLE001  the same result on every rank
                    g.error = exc
                    continue
                if g.prepared:
                    rs = engine.resolve_r([p for p, _, _ in g.prepared] + g.pad, maxima)
                    for (p, layout, _), r in zip(g.prepared, rs):
                        engine.start(layout, p, r, name=f"signcomm.ddp.s{engine.step}.b{p.bi}")
                g.started = True
            if g.error is not None:
                continue
            for p, _, _ in g.prepared:
                h = p.handle
                while not h.done:
                    may = ahead is None or ahead.done or ahead.posted > h.posted
                    if not may or not (block or h.ready()):
                        break
                    h.advance()
                ahead = h

    def finish(self):
        """The last bucket's hook: every vote, then commit, decode, complete the futures."""
        state, engine, it = self.state, self.engine, self.iteration
        t0 = time.perf_counter()
        if self.deferred:
            self.post(it["entries"])
        self.progress(block=True)
        for g in it["groups"]:
            if g.error is not None:
                raise g.error
        for g in it["groups"]:      # every vote succeeded
            for p, layout, ix in g.prepared:
                engine.commit(layout, p.bi)
                if not state.stateless:
                    for j, i in enumerate(ix):
                        state.momentum[i] = layout.momentum(p.bi, j)
                    if self.hierarchy is not None:
                        for i, (lo, hi) in zip(ix, piece_ranges(layout.whole[p.bi],
                                                                layout.buckets[p.bi])):
                            state.pieces[i] = (tuple(ix), lo, hi)
        keep = set()
        for g in it["groups"]:
            for e in g.entries:
                self.decode(e, keep)
        compress_s = sum(p.seconds for g in it["groups"] for p, _, _ in g.prepared)
        vote_s = sum(p.handle.kernel_s for g in it["groups"] for p, _, _ in g.prepared)
        step = engine.step
        summary = self.transport.ledger.summary(step)
        state.stats = dict(step=step, compress_s=compress_s, comm_s=summary.seconds,
                           vote_s=vote_s, hook_s=it["hook_s"] + time.perf_counter() - t0,
                           bytes_sent=summary.bytes_sent,
                           bytes_received=summary.bytes_received,
                           clamped=sum(p.clamped for g in it["groups"] for p, _, _ in g.prepared))
        if self.hierarchy is not None:  # the machines' vote; the calls inside one
            state.stats.update(cross_bytes_sent=summary.data_bytes_sent,
                               cross_bytes_received=summary.data_bytes_received,
                               local_bytes_sent=summary.local_bytes_sent,
                               local_bytes_received=summary.local_bytes_received)
        state.step = step + 1
        self.layouts = {k: v for k, v in self.layouts.items() if id(v) in keep}
        entries = it["entries"]
        state.buckets = tuple(tuple(e.idx) for e in entries)
        self.iteration = None
        self.used[:] = False
        for e in entries:
            e.future.set_result(e.buffer)

    def decode(self, e: _Entry, keep: set):
        """Write the vote of each used parameter (0 elsewhere) into the bucket's buffer,
        in its dtype, through the backend's one decode (``values``)."""
        buf = e.buffer
        base = buf.storage_offset()
        slot = {i: g for i, g in zip(e.idx, e.grads)}
        written = set()
        for layout, bi, ix, p in e.runs:
            keep.add(id(layout))
            b = layout.whole[bi]    # the whole bucket (its shard, under the hierarchy, voted)
            backend = self.engine.backend(layout.device)
            o = backend.to_torch(backend.values(p.handle.vote, b.d))
            start = 0
            for i, n in zip(ix, b.sizes.tolist()):
                view = slot[i]
                if view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
                    raise RuntimeError("signcomm.ddp: a bucket gradient is not a view of its "
                                       "buffer (unsupported DDP version)")
                buf[view.storage_offset() - base:view.storage_offset() - base + n].copy_(
                    o[start:start + n])
                start += n
                written.add(i)
        for i, view in slot.items():
            if i not in written:
                off = view.storage_offset() - base
                buf[off:off + view.numel()].zero_()

    def abandon(self):
        """An error in a hook: finish what was posted (so the ranks stay matched, as far
        as they can), commit nothing, forget the iteration."""
        self.used[:] = False
        if self.iteration is not None:
            try:
                self.progress(block=True)
            except Exception:  # noqa: BLE001  the original error is the one to report
                pass
        self.iteration = None


def _remove(handles):
    for h in handles:
        h.remove()


__all__ = ["MVSMHookState", "hook", "register", "resolve_options", "OPTIONS", "REFUSED",
           "BackendError", "RankMismatchError"]
