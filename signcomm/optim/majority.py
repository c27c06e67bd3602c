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

import torch

from ..comm import get_transport
from ..backends import BackendError
from ..comm.base import Transport
from ..contribution import KINDS as CONTRIBUTIONS, RPolicy
from ..engine import MOMENTUM_INITS, VoteEngine
from ..hierarchy import check_options as check_hierarchy, make_hierarchy
from ..kernels.rules import VoteRule
from ..vote import SCHEDULES
from .buckets import DEFAULT_BUCKET_ELEMENTS
from ..comm.base import RemoteRankError
from .checkpoint import MOMENTUM_KEYS, CheckpointError, check_layout, validate_state
from .common import check_beta, check_group, check_lr, check_weight_decay
from .lockstep import check_lockstep


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
            ready, with non-blocking collectives (``signcomm.optim.overlap``); same results.
        backend: where the kernels run (``signcomm.backends``): "auto" (numba for CPU
            parameters, torch ops for CUDA ones), "numba" (CPU only), "torch" (any
            device; bit-identical to numba on CPU), or a Backend.
        hierarchy: None (a flat vote of every rank) or "host": the hierarchical vote
            (``signcomm.hierarchy``), machines found from the host (ranks that share
            memory): the ranks of a machine average their gradients exactly, each keeps
            the momentum of its shard, and the machines vote, one bit each.
        ranks_per_node: the hierarchical vote with an explicit layout: machine m holds
            ranks m*k .. m*k+k-1 (``k = ranks_per_node``; tests and emulated clusters).
            Every machine must hold the same k (refused on every rank otherwise).  The
            run is MVSM on H = size / k nodes whose gradients are the machine means.

    Parameters may live on CPU or on one CUDA device: momentum, S_R and packing stay
    there; only the packed bits go to the transport.

    After each ``step()``, ``self.stats`` holds this rank's figures for the step:
    ``compress_s`` (momentum + R + packing), ``comm_s`` (time inside collectives),
    ``vote_s`` (the vote kernels), ``update_s``, ``bytes_sent``, ``bytes_received`` and
    ``clamped``; with the hierarchical vote also ``reduce_s`` (staging, agreement and
    the machine mean, waits included), ``cross_bytes_sent`` /
    ``cross_bytes_received`` (the machines' vote) and ``local_bytes_sent`` /
    ``local_bytes_received`` (inside the machine).  ``self.transport.ledger`` has every call.
    """

    def __init__(self, params, lr, beta: float = 0.5, variant: str = "v1", R="global",
                 schedule: str = "allgather", transport=None, weight_decay: float = 0.0,
                 seed: int = 0, tie: str = "coin", *, contribution: str = "sr",
                 momentum_init: str = "first", byzantine: bool = False,
                 bucket_elements: int = DEFAULT_BUCKET_ELEMENTS, lockstep_every: int = 0,
                 overlap: bool = False, backend="auto", hierarchy=None, ranks_per_node=None):
        check_lr(lr)
        check_beta(beta)
        rule = VoteRule(variant, tie)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if contribution not in CONTRIBUTIONS:
            raise ValueError(f"contribution must be one of {CONTRIBUTIONS}, got {contribution!r}")
        if momentum_init not in MOMENTUM_INITS:
            raise ValueError(f"momentum_init must be one of {MOMENTUM_INITS}, got {momentum_init!r}")
        RPolicy(R)  # validates
        check_weight_decay(weight_decay)
        if not (isinstance(transport, (str, Transport)) or transport is None):
            raise ValueError(f"transport must be 'mpi', 'horovod', a Transport or None, got {transport!r}")
        if isinstance(bucket_elements, bool) or not (isinstance(bucket_elements, int) and bucket_elements >= 1):
            raise ValueError(f"bucket_elements must be an int >= 1, got {bucket_elements!r}")
        if check_hierarchy(hierarchy, ranks_per_node) is not None and overlap:
            raise ValueError("overlap=True does not support the hierarchical vote yet "
                             "(hierarchy= / ranks_per_node=): use the synchronous step")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.transport = get_transport(transport)
        self.hierarchy = make_hierarchy(self.transport, hierarchy, ranks_per_node)
        # the momentum a parameter's state holds: the whole tensor's, or (hierarchical
        # vote) the flat share of it in this rank's shards
        self.momentum_key = "momentum_buffer" if self.hierarchy is None else "momentum_shard"
        self.variant, self.schedule_name, self.tie = variant, schedule, tie
        self.contribution, self.momentum_init, self.seed = contribution, momentum_init, int(seed)
        self.R = R
        self.bucket_elements = int(bucket_elements)
        self.lockstep_every = int(lockstep_every)
        self.engine = VoteEngine(self.transport, rule=rule, schedule=schedule, seed=seed,
                                 contribution=contribution, R=R, momentum_init=momentum_init,
                                 invert=byzantine, backend=backend,
                                 bucket_elements=self.bucket_elements, hierarchy=self.hierarchy)
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

    # -- what the engine needs from the optimizer (public: the overlap path uses it) --------
    def entries(self, require_grad=True):
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

    def _stateless(self, group):
        """No momentum (beta = 1 with v_1 = g_1): v_t = g_t, nothing stored."""
        return group["beta"] == 1.0 and self.momentum_init == "first"

    def prepare_bucket(self, layout, bi, entries, grads=None):
        """The engine's ``prepare`` for bucket ``bi`` from the parameters' gradients (or
        ``grads``: the machine means of the hierarchical vote), their groups' beta and
        their stored momentum."""
        groups = [g for g, _, _ in entries]
        return self.engine.prepare(
            layout, bi, [p.grad.detach() for _, p, _ in entries] if grads is None else grads,
            [g["beta"] for g in groups],
            [None if self._stateless(g) else self.state[p].get(self.momentum_key)
             for g, p, _ in entries],
            [name for _, _, name in entries])

    def signature(self, entries):
        """The per-step settings every rank must share, beyond the engine's own (a dict:
        a mismatch names the fields that differ)."""
        return {"step": self.engine.step,
                "parameter shapes and dtypes": tuple((tuple(p.shape), str(p.dtype)) for _, p, _ in entries),
                "lr": tuple(float(g["lr"]) for g, _, _ in entries),
                "beta": tuple(float(g["beta"]) for g, _, _ in entries),
                "weight_decay": tuple(float(g["weight_decay"]) for g, _, _ in entries)}

    def control_capacity(self) -> int:
        """The length of the step's control values (``VoteEngine.start_control``): the
        optimizer's parameter count rounded up to a power of two, at least 8.  So it is
        the same on every rank whichever parameters have a gradient this step and
        whatever the settings, and even for models whose parameter counts differ a
        little (the agreement then names the difference)."""
        count = sum(len(g["params"]) for g in self.param_groups)
        return max(8, 1 << (count - 1).bit_length())

    def commit_bucket(self, layout, bi, entries):
        """v_t of bucket ``bi`` becomes the momentum and the parameters' state."""
        self.engine.commit(layout, bi)
        for j, (group, p, _) in enumerate(entries):
            if not self._stateless(group):
                self.state[p][self.momentum_key] = layout.momentum(bi, j)

    def _machine_means(self, layout, slices, present, step):
        """The hierarchical vote's first half: stage every bucket's gradients, agree
        (layout, settings, finite gradients: an error on every rank before anything is
        sent), and take the machine's mean of this rank's shard of each bucket."""
        engine = self.engine
        staged = [engine.stage(layout, bi, [p.grad.detach() for _, p, _ in present[sl]],
                               [name for _, _, name in present[sl]])
                  for bi, sl in enumerate(slices)]
        engine.start_control(layout, staged, self.signature(present),
                             f"the machine means of optimizer step {step} (parameter layout, "
                             "settings and gradients)", capacity=self.control_capacity()).wait()
        engine.reduce(layout, staged)
        return [engine.mean_segments(layout, bi) for bi in range(len(slices))]

    def apply_bucket(self, layout, bi, entries, vote):
        self.engine.apply(layout, bi, vote, [g["lr"] for g, _, _ in entries],
                          [g["weight_decay"] for g, _, _ in entries])

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        engine = self.engine
        step = engine.step
        ledger = self.transport.ledger
        if self._overlap is None or not self._overlap.started:
            ledger.begin_step(step)
        present = self.entries()
        reduce_s = 0.0
        if self._overlap is not None and self._overlap.matches(present):
            layout, slices, prepared = self._overlap.finish()
        else:
            if self._overlap is not None:
                self._overlap.reset(present)
            try:
                layout = engine.layout_for([p for _, p, _ in present]) if present else None
            except BackendError as exc:  # e.g. mixed devices: an error on every rank
                self.transport.start_agree((step,), error=f"BackendError: {exc}",
                                           what=f"optimizer step {step}",
                                           values=engine.control_values(
                                               [], self.control_capacity())).wait()
                raise
            buckets = layout.buckets if layout is not None else []
            slices, first = [], 0
            for b in buckets:
                slices.append(slice(first, first + len(b.params)))
                first += len(b.params)
            means = None
            if engine.hierarchy is not None and layout is not None:
                t_reduce = time.perf_counter()
                means = self._machine_means(layout, slices, present, step)
                reduce_s = time.perf_counter() - t_reduce
            prepared = [self.prepare_bucket(layout, bi, present[sl],
                                            None if means is None else means[bi])
                        for bi, sl in enumerate(slices)]
            what = f"the vote of optimizer step {step} (parameter layout, settings and gradients)"
            control = engine.start_control(layout, prepared, self.signature(present), what,
                                           capacity=self.control_capacity()) \
                if layout is not None else self.transport.start_agree(
                    self.signature(present), what=what,
                    values=engine.control_values([], self.control_capacity()))
            maxima = control.wait()
            if not present:
                engine.step += 1
                return loss
            for p, r in zip(prepared, engine.resolve_r(prepared, maxima)):
                engine.start(layout, p, r)
            for p in prepared:
                p.handle.finish()
        for bi, sl in enumerate(slices):  # every vote succeeded
            self.commit_bucket(layout, bi, present[sl])
        compress_s = sum(p.seconds for p in prepared)
        vote_s = sum(p.handle.kernel_s for p in prepared)
        t3 = time.perf_counter()
        for bi, sl in enumerate(slices):
            self.apply_bucket(layout, bi, present[sl], prepared[bi].handle.vote)
        update_s = time.perf_counter() - t3
        engine.step += 1
        if self.lockstep_every and engine.step % self.lockstep_every == 0:
            check_lockstep([p for _, p, _ in present], self.transport, step)
        summary = ledger.summary(step)
        self.stats = dict(step=step, compress_s=compress_s, comm_s=summary.seconds,
                          vote_s=max(vote_s, 0.0), update_s=update_s,
                          bytes_sent=summary.bytes_sent, bytes_received=summary.bytes_received,
                          clamped=sum(p.clamped for p in prepared),
                          step_s=time.perf_counter() - t0)
        if self.hierarchy is not None:  # the vote among machines; the calls inside one
            self.stats.update(reduce_s=reduce_s, cross_bytes_sent=summary.data_bytes_sent,
                              cross_bytes_received=summary.data_bytes_received,
                              local_bytes_sent=summary.local_bytes_sent,
                              local_bytes_received=summary.local_bytes_received)
        return loss

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """Torch's state dict plus ``signcomm``: step counter (= the position of every
        random stream, which are counter-based), seed, rank and number of ranks.
        Momentum is this rank's own: save one file per rank."""
        sd = super().state_dict()
        sd["signcomm"] = dict(step=self.engine.step, seed=self.seed, rank=self.transport.rank,
                              size=self.transport.size, variant=self.variant)
        if self.hierarchy is not None:
            sd["signcomm"]["hierarchy"] = self.layout_record()
        return sd

    def layout_record(self):
        """The hierarchical layout a checkpoint records (None for a flat vote)."""
        h = self.hierarchy
        return None if h is None else dict(h.describe(), bucket_elements=self.bucket_elements,
                                            machine=h.machine, local_rank=h.local_rank)

    def load_state_dict(self, state_dict):
        """Torch's, after ``checkpoint.validate_state`` (shapes, finite momentum, step in
        range) and ``checkpoint.check_layout`` (the hierarchical layout that wrote it): a
        ``CheckpointError`` naming the field, nothing changed.  Under the hierarchical
        vote loading is collective (every rank loads the file it wrote, at the same
        time): a rank whose file does not fit raises ``CheckpointError`` and every other
        rank ``RemoteRankError``; ranks resuming different steps ``RankMismatchError``."""
        error = None
        try:
            validate_state([p for g in self.param_groups for p in g["params"]], state_dict)
            check_layout(state_dict, self.layout_record())
        except CheckpointError as exc:
            error = exc
        if self.hierarchy is not None:
            meta = state_dict.get("signcomm") if isinstance(state_dict, dict) else None
            step = meta.get("step") if isinstance(meta, dict) and error is None else None
            try:
                self.transport.agree({"checkpoint step": step}, error=None if error is None
                                     else f"{type(error).__name__}: {error}",
                                     what="loading the optimizer's checkpoint")
            except RemoteRankError:
                if error is None:
                    raise
        if error is not None:
            raise error
        state_dict = dict(state_dict)
        meta = state_dict.pop("signcomm", None)
        # torch casts floating state to each parameter's dtype on load, which would round
        # an fp16/bf16 parameter's fp32 momentum: keep the saved fp32 tensors instead
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        momenta = {(i, key): state_dict["state"][i][key] for i in saved_ids
                   for key in MOMENTUM_KEYS if key in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        params = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for (i, key), m in momenta.items():
            p = params[i]
            self.state[p][key] = m.to(device=p.device, dtype=torch.float32, copy=True)
        if meta is not None:
            self.engine.step = int(meta["step"])
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
