"""Vote schedules: how the packed signs of n ranks become one vote on every rank.

Each schedule takes this rank's packed bits (one bit per coordinate, ``kernels.bits``
convention) and returns the same ``Vote`` on every rank, for

- v1 (eq. 10): o = sign(c - n/2), ties (even n) by the tie rule ("coin": a fair coin of
  the shared stream, the default; "zero": o = 0);
- v2 (eq. 11): o = S_1((2c - n) / n), +1 with probability c / n, drawn from the shared
  stream at the coordinate's position, so every rank (and every schedule) draws alike.

Schedules (bytes per rank per vote, d coordinates, n ranks; docs/algorithms.md):

=============  =========================================  ==============================
allgather      allgather packed vectors, every rank votes  (n-1) * ceil(d/8) each way
sharded        alltoall shards, owner votes its shard,     2 (n-1) * s each way,
               allgather voted shards                      s = ceil(ceil(d/8) / n)
allreduce      sum count fields of b = ceil(log2(n+1))     2 (n-1)/n * 8 W each way,
               bits (63 // b per int64 word) by allreduce  W = ceil(d / (63 // b))
=============  =========================================  ==============================

With tie="zero" and even n the sharded schedule's second round also carries the
non-zero mask (3 (n-1) s each way).

Each schedule is non-blocking: ``start(packed, d, step, offset)`` posts its first
collective and returns a ``VoteHandle``; ``finish()`` waits, runs the vote kernels and
posts the next round where there is one (sharded).  Round k of every vote goes on the
transport's channel k, so a driver that starts the buckets' rounds in bucket order on
every rank may interleave buckets freely.  ``vote()`` = start + finish.  The arrays are
NumPy, CuPy or torch (any device), with the backend's kernels (``signcomm.backends``).
"""
from __future__ import annotations

import time

import numpy as np

from . import kernels as K
from .comm import get_transport, ring_allreduce_bytes
from .comm.base import Transport
from .contribution import (R_POLICIES, Contribution, RPolicy, local_max_abs,  # noqa: F401
                           safe_r, shared_r)
from .kernels.rules import VoteRule

SCHEDULES = ("allgather", "sharded", "allreduce")


def vote_keys(seed: int, step: int):
    """The shared keys of one step: (tie coin key, S_1 key)."""
    return (VoteRule("v1").shared_key(seed, step), VoteRule("v2").shared_key(seed, step))


def backend_for(array, backend=None):
    """The backend given, else the one for ``array``'s kind (torch tensors: torch;
    NumPy and CuPy: the kernels of ``signcomm.kernels``)."""
    from .backends import get_backend
    if backend is not None:
        return get_backend(backend)
    return get_backend("torch" if type(array).__module__.startswith("torch") else "numba")


class VoteHandle:
    """One vote in flight: the posted collective of its current round, and the rest of
    the schedule (a generator that yields the next round's posted collective and
    returns the ``Vote``).  ``ready()`` does not block; ``advance()`` waits for the
    current round and runs the kernels up to the next post; ``finish()`` to the end.
    ``kernel_s`` is the time spent in the vote kernels (not in collectives)."""

    def __init__(self, rounds):
        self._rounds = rounds
        self.kernel_s = 0.0
        self.vote = None
        t0 = time.perf_counter()
        self._pending = next(rounds)
        self.kernel_s += time.perf_counter() - t0
        self.posted = 1

    @property
    def done(self) -> bool:
        return self._pending is None

    def ready(self) -> bool:
        return self._pending is not None and self._pending.test()

    def advance(self):
        if self._pending is None:
            return
        result = self._pending.wait()
        t0 = time.perf_counter()
        try:
            self._pending = self._rounds.send(result)
            self.posted += 1
        except StopIteration as stop:
            self.vote, self._pending = stop.value, None
        self.kernel_s += time.perf_counter() - t0

    def finish(self) -> K.Vote:
        while self._pending is not None:
            self.advance()
        return self.vote


def _clear_pad(a, d):
    if d % 8 and a.shape[0]:
        a[K.packed_nbytes(d) - 1] &= (1 << (d % 8)) - 1
    return a


class Schedule:
    """Base of the three schedules: ``start(packed, d, step, offset)`` -> ``VoteHandle``,
    ``vote(...)`` -> ``Vote``."""

    name = "abstract"

    def __init__(self, transport: Transport | str | None = None, *, variant: str = "v1",
                 tie: str = "coin", seed: int = 0, rule: VoteRule | None = None):
        self.rule = VoteRule.of(rule, variant=variant, tie=tie)
        self.transport = get_transport(transport)
        self.seed = int(seed)

    @property
    def variant(self):
        return self.rule.variant

    @property
    def tie(self):
        return self.rule.tie

    @property
    def n(self):
        return self.transport.size

    def _key(self, step):
        return self.rule.shared_key(self.seed, step)

    def _check(self, packed, d):
        if len(packed.shape) != 1 or str(packed.dtype) not in ("uint8", "torch.uint8"):
            raise TypeError(f"packed must be a 1-D uint8 array, got {packed.dtype} {tuple(packed.shape)}")
        if packed.shape[0] < K.packed_nbytes(d):
            raise ValueError(f"packed has {packed.shape[0]} bytes, too short for d={d} "
                             f"(needs {K.packed_nbytes(d)})")
        return packed[: K.packed_nbytes(d)]

    def start(self, packed, d: int, step: int, offset: int = 0, *, backend=None,
              name: str | None = None) -> VoteHandle:
        return VoteHandle(self.rounds(packed, d, step, offset, backend=backend, name=name))

    def rounds(self, packed, d: int, step: int, offset: int = 0, *, backend=None,
               name: str | None = None):
        """The vote as a generator of rounds (what ``start`` wraps in a ``VoteHandle``):
        it yields each round's posted collective, is sent its result, and returns the
        ``Vote``.  A driver with rounds of its own around the vote (the hierarchical vote,
        ``signcomm.hierarchy``) delegates to it with ``yield from``."""
        packed = self._check(packed, d)
        b = backend_for(packed, backend)
        return self._rounds(packed, int(d), step, offset, b, name or self.name)

    def vote(self, packed, d: int, step: int, offset: int = 0, *, backend=None) -> K.Vote:
        return self.start(packed, d, step, offset, backend=backend).finish()

    def _rounds(self, packed, d, step, offset, b, name):
        raise NotImplementedError
        yield  # noqa: a generator

    def predicted_bytes(self, d: int) -> int:
        """Bytes this rank sends (= receives) for one vote of d coordinates."""
        raise NotImplementedError


class AllgatherVote(Schedule):
    """Every rank gathers the n packed vectors and runs the popcount vote (one round)."""

    name = "allgather"

    def _rounds(self, packed, d, step, offset, b, name):
        gathered = yield self.transport.start_allgather(packed, channel=1, name=f"{name}.1")
        return b.vote(gathered, d, self.rule, self._key(step), offset)

    def predicted_bytes(self, d):
        return (self.n - 1) * K.packed_nbytes(d)


class ShardedVote(Schedule):
    """Alltoall of packed shards, each rank votes its own shard, allgather of the voted
    bits: the paper's one bit up, one bit down; volume flat in n."""

    name = "sharded"

    def shard_bytes(self, d):
        return -(-K.packed_nbytes(d) // self.n)

    def _rounds(self, packed, d, step, offset, b, name):
        n, r = self.n, self.transport.rank
        nbytes, s = K.packed_nbytes(d), self.shard_bytes(d)
        padded = b.zeros(n * s, packed)
        padded[:nbytes] = packed
        mine = yield self.transport.start_alltoall(padded.reshape(n, s), channel=1,
                                                   name=f"{name}.1")  # row j: my shard of rank j
        lo = min(8 * r * s, d)
        d_mine = min(8 * (r + 1) * s, d) - lo
        nb_mine = K.packed_nbytes(d_mine)
        v = b.vote(mine, d_mine, self.rule, self._key(step), offset + lo)
        shard = b.zeros(s, packed)
        shard[:nb_mine] = v.bits[:nb_mine]
        if self._sends_mask():
            mask = b.zeros(s, packed)
            if v.nonzero is not None:
                mask[:nb_mine] = v.nonzero[:nb_mine]
            else:
                mask[:nb_mine] = 0xFF
            _clear_pad(mask[:nb_mine], d_mine)
            both = yield self.transport.start_allgather(b.cat([shard, mask]), channel=2,
                                                        name=f"{name}.2")
            both = both.reshape(n, 2, s)
            return K.Vote(b.copy(both[:, 0].reshape(-1)[:nbytes]),
                          b.copy(both[:, 1].reshape(-1)[:nbytes]))
        bits = yield self.transport.start_allgather(shard, channel=2, name=f"{name}.2")
        return K.Vote(b.copy(bits.reshape(-1)[:nbytes]))

    def _sends_mask(self):
        return self.rule.has_zeros(self.n)

    def predicted_bytes(self, d):
        return (self.n - 1) * self.shard_bytes(d) * (3 if self._sends_mask() else 2)


class AllreduceVote(Schedule):
    """Packed-count fields summed by an ordinary allreduce; exact counts on every rank."""

    name = "allreduce"

    def _rounds(self, packed, d, step, offset, b, name):
        bits = K.count_field_bits(self.n)
        summed = yield self.transport.start_allreduce(b.count_fields(packed, d, bits), "sum",
                                                      channel=1, name=f"{name}.1")
        counts = b.fields_to_counts(summed, d, bits)
        return b.decide(counts, self.n, self.rule, self._key(step), offset)

    def predicted_bytes(self, d):
        words = K.count_field_words(d, K.count_field_bits(self.n))
        return ring_allreduce_bytes(8 * words, self.n)


_SCHEDULE_CLASSES = {c.name: c for c in (AllgatherVote, ShardedVote, AllreduceVote)}


def make_schedule(name: str, transport=None, **options) -> Schedule:
    """``make_schedule("allgather" | "sharded" | "allreduce", transport, variant=...,
    tie=..., seed=...)`` (or ``rule=VoteRule(...)``)."""
    try:
        cls = _SCHEDULE_CLASSES[name]
    except KeyError:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}") from None
    return cls(transport, **options)


class SignVote:
    """Sign (or S_R) + pack + vote for one flat NumPy/CuPy/torch buffer, the whole path
    of one bucket, for use outside the optimizer.

    ``R=None`` contributes sign(v) (signSGD-MV, Signum-MV; an exact 0 is a fair coin of
    the rank's stream); otherwise S_R(v) (eq. 8) with ``R="global"`` (shared per segment,
    the default of the training wrapper), ``"local"`` (this rank's max, no traffic,
    biased) or a fixed float (clamped; ``last_clamped`` counts clamped coordinates).

    Before any data moves, ranks agree (one tiny allreduce, which also carries the
    shared R) on d, dtype, segment layout and schedule, and on whether any rank's input
    has NaN/Inf; a disagreement raises on every rank, never hangs."""

    def __init__(self, transport=None, *, schedule: str = "allgather", variant: str = "v1",
                 tie: str = "coin", seed: int = 0, R=None, invert: bool = False,
                 rule: VoteRule | None = None):
        self.policy = RPolicy(R)
        self.schedule = make_schedule(schedule, transport, variant=variant, tie=tie, seed=seed,
                                      rule=rule)
        self.transport = self.schedule.transport
        self.R, self.seed = R, int(seed)
        self.contribution = Contribution("sign" if R is None else "sr", seed=seed,
                                         rank=self.transport.rank, invert=invert)
        self.last_clamped = 0
        self.last_r = None

    def pack(self, v, step, *, seg_sizes=None, offset=0, check=True):
        """This rank's packed contribution (after a consistency check across ranks)."""
        if len(v.shape) != 1:
            raise ValueError(f"v must be a flat 1-D array, got shape {tuple(v.shape)}")
        b = backend_for(v)
        if not str(v.dtype).replace("torch.", "").startswith(("float", "bfloat")):
            raise TypeError(f"v must be a float array, got dtype {v.dtype}")
        d = v.shape[0]
        seg = np.array([d] if seg_sizes is None else seg_sizes, dtype=np.int64)
        local = local_max_abs(b.host(v), seg)
        nonfinite = not np.all(np.isfinite(local))
        error = f"non-finite (NaN/Inf) input to the sign vote at step {step}" if nonfinite else None
        if check:
            top = self.transport.start_agree(
                (d, str(v.dtype), seg, self.schedule.name, self.schedule.variant,
                 self.schedule.tie, str(self.R), step, offset), error=error,
                what=f"the sign vote of step {step}",
                values=np.where(np.isfinite(local), local, 0.0) if self.policy.shared else None,
            ).wait()
        elif nonfinite:
            raise K.NonFiniteError(error)
        r = self.policy.resolve(local, top if check and self.policy.shared else None,
                                transport=self.transport)
        return self.contribute(v, step, r=r, seg_sizes=seg, offset=offset)

    def resolve_r(self, local_max):
        """Per-segment R under this policy from this rank's per-segment max |v|
        (``None`` for sign contributions).  "global" makes one MAX allreduce."""
        return self.policy.resolve(local_max, transport=self.transport)

    def contribute(self, v, step, *, r=None, seg_sizes=None, offset=0):
        """Pack this rank's bits without any check or communication: sign(v) when
        ``r`` is None, else S_R(v) with per-segment ``r``."""
        packed, self.last_clamped = self.contribution.pack(
            backend_for(v), v, step, r=r, seg_sizes=seg_sizes, offset=offset)
        self.last_r = r
        return packed

    def __call__(self, v, step, *, seg_sizes=None, offset=0, check=True) -> K.Vote:
        packed = self.pack(v, step, seg_sizes=seg_sizes, offset=offset, check=check)
        return self.schedule.vote(packed, v.shape[0], step, offset)
