"""Vote schedules: how the packed signs of n ranks become one vote on every rank.

Each schedule takes this rank's packed bits (one bit per coordinate, ``kernels.bits``
convention) and returns the same ``Vote`` on every rank, for

- v1 (eq. 10): o = sign(c - n/2), ties (even n) by the tie rule ("coin": a fair coin of
  the shared stream, the default; "zero": o = 0);
- v2 (eq. 11): o = S_1((2c - n) / n), +1 with probability c / n, drawn from the shared
  stream at the coordinate's position, so every rank (and every schedule) draws alike.

Schedules (bytes per rank per vote, d coordinates, n ranks; ALGORITHMS.md's table):

=============  =========================================  ==============================
allgather      allgather packed vectors, every rank votes  (n-1) * ceil(d/8) each way
sharded        alltoall shards, owner votes its shard,     2 (n-1) * s each way,
               allgather voted shards                      s = ceil(ceil(d/8) / n)
allreduce      sum count fields of b = ceil(log2(n+1))     2 (n-1)/n * 8 W each way,
               bits (63 // b per int64 word) by allreduce  W = ceil(d / (63 // b))
=============  =========================================  ==============================

With tie="zero" and even n the sharded schedule's second round also carries the
non-zero mask (3 (n-1) s each way).
"""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .comm import get_transport, ring_allreduce_bytes
from .comm.base import Transport

SCHEDULES = ("allgather", "sharded", "allreduce")


def vote_keys(seed: int, step: int):
    """The shared keys of one step: (tie coin key, S_1 key)."""
    return (K.key64(seed, K.stream_id(K.Purpose.TIE_COIN), step),
            K.key64(seed, K.stream_id(K.Purpose.S1), step))


class Schedule:
    """Base of the three schedules: ``vote(packed, d, step, offset)`` -> ``Vote``."""

    name = "abstract"

    def __init__(self, transport: Transport | str | None = None, *, variant: str = "v1",
                 tie: str = "coin", seed: int = 0):
        if variant not in K.VARIANTS:
            raise ValueError(f"variant must be one of {K.VARIANTS}, got {variant!r}")
        if tie not in K.TIE_RULES:
            raise ValueError(f"tie must be one of {K.TIE_RULES}, got {tie!r}")
        self.transport = get_transport(transport)
        self.variant, self.tie, self.seed = variant, tie, int(seed)

    @property
    def n(self):
        return self.transport.size

    def _key(self, step):
        tie_key, s1_key = vote_keys(self.seed, step)
        return s1_key if self.variant == "v2" else tie_key

    def _check(self, packed, d):
        if packed.ndim != 1 or packed.dtype != np.uint8:
            raise TypeError(f"packed must be a 1-D uint8 array, got {packed.dtype} {packed.shape}")
        K.check_packed(packed, d)
        return packed[: K.packed_nbytes(d)]

    def vote(self, packed, d: int, step: int, offset: int = 0) -> K.Vote:
        raise NotImplementedError

    def predicted_bytes(self, d: int) -> int:
        """Bytes this rank sends (= receives) for one vote of d coordinates."""
        raise NotImplementedError


class AllgatherVote(Schedule):
    """Every rank gathers the n packed vectors and runs the popcount vote (one round)."""

    name = "allgather"

    def vote(self, packed, d, step, offset=0):
        packed = self._check(packed, d)
        gathered = self.transport.allgather(packed)
        return K.majority_vote(gathered, d, variant=self.variant, tie=self.tie,
                               key=self._key(step), offset=offset)

    def predicted_bytes(self, d):
        return (self.n - 1) * K.packed_nbytes(d)


class ShardedVote(Schedule):
    """Alltoall of packed shards, each rank votes its own shard, allgather of the voted
    bits: the paper's one bit up, one bit down; volume flat in n."""

    name = "sharded"

    def shard_bytes(self, d):
        return -(-K.packed_nbytes(d) // self.n)

    def vote(self, packed, d, step, offset=0):
        packed = self._check(packed, d)
        n, r = self.n, self.transport.rank
        nbytes, s = K.packed_nbytes(d), self.shard_bytes(d)
        padded = np.zeros(n * s, np.uint8)
        padded[:nbytes] = packed
        mine = self.transport.alltoall(padded.reshape(n, s))  # row j: my shard of rank j
        lo = min(8 * r * s, d)
        d_mine = min(8 * (r + 1) * s, d) - lo
        v = K.majority_vote(mine, d_mine, variant=self.variant, tie=self.tie,
                            key=self._key(step), offset=offset + lo)
        shard = np.zeros(s, np.uint8)
        shard[: K.packed_nbytes(d_mine)] = v.bits[: K.packed_nbytes(d_mine)]
        if self._sends_mask():
            mask = np.zeros(s, np.uint8)
            mask[: K.packed_nbytes(d_mine)] = (v.nonzero if v.nonzero is not None
                                                else np.full(K.packed_nbytes(d_mine), 0xFF, np.uint8))
            K.clear_padding(mask[: K.packed_nbytes(d_mine)], d_mine)
            both = self.transport.allgather(np.concatenate([shard, mask])).reshape(n, 2, s)
            return K.Vote(both[:, 0].reshape(-1)[:nbytes].copy(), both[:, 1].reshape(-1)[:nbytes].copy())
        bits = self.transport.allgather(shard).reshape(-1)[:nbytes].copy()
        return K.Vote(bits)

    def _sends_mask(self):
        return self.variant == "v1" and self.tie == "zero" and self.n % 2 == 0

    def predicted_bytes(self, d):
        return (self.n - 1) * self.shard_bytes(d) * (3 if self._sends_mask() else 2)


class AllreduceVote(Schedule):
    """Packed-count fields summed by an ordinary allreduce; exact counts on every rank."""

    name = "allreduce"

    def vote(self, packed, d, step, offset=0):
        packed = self._check(packed, d)
        b = K.count_field_bits(self.n)
        words = self.transport.allreduce(K.pack_count_fields(packed, d, b), "sum")
        counts = K.unpack_count_fields(words, d, b)
        return K.vote_from_counts(counts, self.n, variant=self.variant, tie=self.tie,
                                  key=self._key(step), offset=offset)

    def predicted_bytes(self, d):
        words = K.count_field_words(d, K.count_field_bits(self.n))
        return ring_allreduce_bytes(8 * words, self.n)


_SCHEDULE_CLASSES = {c.name: c for c in (AllgatherVote, ShardedVote, AllreduceVote)}


def make_schedule(name: str, transport=None, **options) -> Schedule:
    """``make_schedule("allgather" | "sharded" | "allreduce", transport, variant=...,
    tie=..., seed=...)``."""
    try:
        cls = _SCHEDULE_CLASSES[name]
    except KeyError:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}") from None
    return cls(transport, **options)


def safe_r(r):
    """R for S_R with the R = 0 guard: a segment whose bound is 0 holds only zeros, and
    S_R(0) is a fair coin for any R > 0, so R = 0 becomes 1 (fair coin flips)."""
    r = np.asarray(r, dtype=np.float64)
    return np.where(r > 0, r, 1.0)


def local_max_abs(v, seg_sizes):
    """max |v| of each segment (NaN if the segment has a NaN; 0 for an empty segment)."""
    v = np.asarray(v)
    seg_sizes = np.asarray(seg_sizes, dtype=np.int64)
    out = np.zeros(seg_sizes.shape[0], np.float64)
    nonempty = seg_sizes > 0
    if nonempty.any():
        starts = np.concatenate([[0], np.cumsum(seg_sizes)[:-1]])[nonempty]
        a = np.abs(v)
        out[nonempty] = np.maximum.reduceat(a, starts)
        nan = np.add.reduceat(np.isnan(a), starts) > 0
        out[np.flatnonzero(nonempty)[nan]] = np.nan
    return out


def shared_r(transport: Transport, local_max) -> np.ndarray:
    """Shared per-segment R: the max over ranks of each segment's max |v| (one MAX
    allreduce for all segments), with the R = 0 guard of ``safe_r``."""
    transport = get_transport(transport)
    local_max = np.ascontiguousarray(local_max, dtype=np.float64)
    with transport.ledger.kind("control"):
        return safe_r(transport.allreduce(local_max, "max"))


R_POLICIES = ("global", "local")


class SignVote:
    """Sign (or S_R) + pack + vote for one flat buffer, the whole path of one bucket.

    ``R=None`` contributes sign(v) (signSGD-MV, Signum-MV; an exact 0 is a fair coin of
    the rank's stream); otherwise S_R(v) (eq. 8) with ``R="global"`` (shared per segment,
    the default of the training wrapper), ``"local"`` (this rank's max, no traffic,
    biased) or a fixed float (clamped; ``last_clamped`` counts clamped coordinates).

    Before any data moves, ranks agree (one tiny allreduce) on d, dtype, segment layout
    and schedule, and on whether any rank's input has NaN/Inf; a disagreement raises on
    every rank, never hangs."""

    def __init__(self, transport=None, *, schedule: str = "allgather", variant: str = "v1",
                 tie: str = "coin", seed: int = 0, R=None, invert: bool = False):
        if not (R is None or R in R_POLICIES or isinstance(R, (int, float))):
            raise ValueError(f"R must be None, 'global', 'local' or a positive float, got {R!r}")
        if isinstance(R, (int, float)) and not (np.isfinite(R) and R > 0):
            raise ValueError(f"a fixed R must be positive and finite, got {R!r}")
        self.schedule = make_schedule(schedule, transport, variant=variant, tie=tie, seed=seed)
        self.transport = self.schedule.transport
        self.R, self.seed, self.invert = R, int(seed), bool(invert)
        self.last_clamped = 0
        self.last_r = None

    def _rank_key(self, purpose, step):
        return K.key64(self.seed, K.stream_id(purpose, self.transport.rank), step)

    def pack(self, v, step, *, seg_sizes=None, offset=0, check=True):
        """This rank's packed contribution (and a consistency check across ranks)."""
        v = np.asarray(v)
        if v.ndim != 1:
            raise ValueError(f"v must be a flat 1-D array, got shape {v.shape}")
        if v.dtype.kind != "f":
            raise TypeError(f"v must be a float array, got dtype {v.dtype}")
        d = v.shape[0]
        seg = np.array([d] if seg_sizes is None else seg_sizes, dtype=np.int64)
        local = local_max_abs(v, seg) if self.R is not None else None
        nonfinite = (not np.all(np.isfinite(local))) if local is not None else not np.isfinite(v).all()
        if check:
            self.transport.agree(
                (d, v.dtype.str, seg, self.schedule.name, self.schedule.variant, self.schedule.tie,
                 str(self.R), step, offset),
                error=f"non-finite (NaN/Inf) input to the sign vote at step {step}" if nonfinite else None,
                what=f"the sign vote of step {step}")
        elif nonfinite:
            raise K.NonFiniteError(f"non-finite (NaN/Inf) input to the sign vote at step {step}")
        return self.contribute(v, step, r=self.resolve_r(local), seg_sizes=seg, offset=offset)

    def resolve_r(self, local_max):
        """Per-segment R under this policy from this rank's per-segment max |v|
        (``None`` for sign contributions).  "global" makes one MAX allreduce."""
        if self.R is None:
            return None
        if self.R == "global":
            return shared_r(self.transport, local_max)
        if self.R == "local":
            return safe_r(local_max)
        return np.full(np.asarray(local_max).shape[0], float(self.R))

    def contribute(self, v, step, *, r=None, seg_sizes=None, offset=0):
        """Pack this rank's bits without any check or communication: sign(v) when
        ``r`` is None, else S_R(v) with per-segment ``r``."""
        d = v.shape[0]
        if r is None:
            packed = K.pack_signs(v, zero_key=self._rank_key(K.Purpose.ZERO_COIN, step),
                                  offset=offset, check_finite=False)
            self.last_clamped, self.last_r = 0, None
        else:
            packed, self.last_clamped = K.stochastic_sign_pack(
                v, r, self._rank_key(K.Purpose.STOCHASTIC_SIGN, step), seg_sizes=seg_sizes,
                offset=offset, check_finite=False)
            self.last_r = r
        if self.invert:  # a Byzantine rank: sends the opposite of its signs
            np.invert(packed, out=packed)
            K.clear_padding(packed, d)
        return packed

    def __call__(self, v, step, *, seg_sizes=None, offset=0, check=True) -> K.Vote:
        packed = self.pack(v, step, seg_sizes=seg_sizes, offset=offset, check=check)
        return self.schedule.vote(packed, np.asarray(v).shape[0], step, offset)
