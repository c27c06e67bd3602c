"""The hierarchical vote: exact averaging inside a machine, one bit between machines.

H machines of k ranks each (``ranks_per_node=k``: machine m holds ranks m*k .. m*k+k-1;
``hierarchy="host"``: the ranks that share a host, ``MPI.COMM_TYPE_SHARED``).  For each
fusion bucket of d coordinates, local rank i of machine m (docs/algorithms.md,
"Hierarchical vote"):

1. reduce-scatter inside the machine: one alltoall of the fp32 gradients on the
   machine's transport gives rank i shard i of the bucket (``shard_range``: boundaries
   are multiples of 64 coordinates, so the shards' packed bits concatenate) of the
   machine's mean gradient, summed in local-rank order (``machine_mean``);
2. the engine's momentum (eq. 9), shared R and contribution (eq. 8) on that shard only:
   the shard's momentum is this rank's share of the machine's; its random streams are
   flat rank m's, at the global positions;
3. the vote (eq. 10 / 11) among the H ranks that hold shard i, one per machine (the
   cross transport, whose rank is m), with any schedule;
4. an allgather of the voted shard bits inside the machine (``rounds``), so every rank
   applies the whole vote.

Both exchanges inside the machine go through the transport's ``start_alltoall_rows`` /
``start_allgather_rows``: on MPI ranks that share a host they read the peers' pieces in
place from a shared-memory window (``signcomm.comm.shm``), elsewhere they are the
alltoall / allgather; the sums are the same either way.

So a run on H x k ranks is MVSM on H nodes whose gradients are the machine means, bit
for bit.  ``make_hierarchy`` builds the rank layout (and refuses machines of different
k on every rank); the engine (``signcomm.engine``) drives the step.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as K
from .buckets import Bucket

ALIGN = 64           # shard boundaries are multiples of this many coordinates
HIERARCHIES = (None, "host")


def check_options(hierarchy, ranks_per_node):
    """The layout asked for, as a string ("host", "ranks_per_node=k"), or None (flat);
    ``ValueError`` for a bad value (local: every rank that passes it raises)."""
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"hierarchy must be None (a flat vote) or 'host' (machines from the "
                         f"host), got {hierarchy!r}; for an explicit layout pass ranks_per_node=k")
    if ranks_per_node is None:
        return hierarchy
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)) \
            or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be an int >= 1, got {ranks_per_node!r}")
    if hierarchy is not None:
        raise ValueError("give hierarchy='host' (machines found from the host) or "
                         "ranks_per_node=k (machine m holds ranks m*k .. m*k+k-1), not both")
    return f"ranks_per_node={int(ranks_per_node)}"


def shard_span(d: int, k: int) -> int:
    """Coordinates per shard: ceil(d / k) rounded up to a multiple of 64 (at least 64)."""
    return max(ALIGN, -(-(-(-d // k)) // ALIGN) * ALIGN)


def shard_range(d: int, k: int, i: int):
    """(lo, hi): the coordinates of a d-coordinate bucket that local rank i of k holds
    (the last shards may be shorter or empty)."""
    span = shard_span(d, k)
    lo = min(d, i * span)
    return lo, min(d, lo + span)


def shard_bucket(bucket: Bucket, k: int, i: int) -> Bucket:
    """Shard i of ``bucket``: the same parameters, each one's share of the shard as its
    segment (0 for a parameter outside it), and the global offset of the shard."""
    lo, hi = shard_range(bucket.d, k, i)
    ends = np.cumsum(bucket.sizes)
    starts = ends - bucket.sizes
    sizes = np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0, None).astype(np.int64)
    return Bucket(bucket.params, sizes, bucket.offset + lo)


def piece_ranges(whole: Bucket, shard: Bucket):
    """(lo, hi) per parameter of ``whole``: the part of the parameter (its own flat
    coordinates) that ``shard`` (a ``shard_bucket`` of it) holds, maybe empty."""
    ends = np.cumsum(whole.sizes)
    starts = ends - whole.sizes
    lo = shard.offset - whole.offset
    a = np.clip(lo - starts, 0, whole.sizes)
    return [(int(x), int(x) + int(n)) for x, n in zip(a, shard.sizes)]


def machine_mean(rows, out):
    """The machine's mean gradient over its k ranks, from ``rows`` (k rows of span fp32,
    row j from local rank j) into ``out`` (span,): ``((g_0 + g_1) + g_2) + ... + g_{k-1}``,
    then ``/ k``, every operation in fp32 rounded to nearest.  For k = 2 any order gives
    the same bits; for k > 2 this order is the contract (docs/algorithms.md)."""
    k = len(rows)
    if k == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)   # one pass fewer than copy, then add
    for j in range(2, k):
        out.add_(rows[j])
    return out.div_(k)


class Hierarchy:
    """This rank's place: ``world`` (every rank: the step's control calls), ``local``
    (the k ranks of its machine; its rank is the local rank i) and ``cross`` (the H ranks
    holding local rank i, one per machine; its rank is the machine m).  The three share
    one byte ledger; the machine's own calls are recorded with kind "local"."""

    def __init__(self, world, local, cross, spec):
        self.world, self.local, self.cross, self.spec = world, local, cross, spec
        self.k, self.machines = local.size, cross.size
        self.local_rank, self.machine = local.rank, cross.rank

    def describe(self) -> dict:
        return {"machines": self.machines, "ranks_per_node": self.k}

    def __repr__(self):
        return (f"Hierarchy({self.machines} machines x {self.k} ranks, {self.spec}; machine "
                f"{self.machine}, local rank {self.local_rank})")

    # -- 1. the machine's mean gradient, shard by shard ------------------------------------
    def send_buffer(self, layout, bi, *, name):
        """Where to stage bucket ``bi``'s gradients for ``start_mean`` (k * span fp32): the
        machine transport's own buffer when it takes one without a copy (``rows_buffer``:
        MPI's shared-memory window, from the bucket's second step on; the layout's own
        buffer for the bucket is then released), else ``layout.staging(bi)``."""
        if layout.device.type == "cpu":
            buf = self.local.rows_buffer((self.k, 4 * layout.spans[bi]), channel=1, name=name)
            if buf is not None:
                layout.release_staging(bi)
                return torch.from_numpy(buf.reshape(-1)).view(torch.float32)
        return layout.staging(bi)

    def start_mean(self, staged, span, *, name=None):
        """Post the alltoall of ``staged`` (k * span fp32: the bucket's gradients, shard j
        in row j) on the machine's transport (channel 1; ``name`` one per bucket)."""
        with self.local.ledger.kind("local"):
            return self.local.start_alltoall_rows(_as_bytes(staged).reshape(self.k, 4 * span),
                                                  channel=1, name=name)

    def finish_mean(self, handle, out):
        """Wait for ``start_mean``'s alltoall; the machine mean of this rank's shard into
        ``out`` (span fp32)."""
        return machine_mean([_as_float32(row) for row in handle.wait()], out)

    def machine_max(self, values):
        """Elementwise max of float64 ``values`` over the machine's ranks (R="local":
        the node's own per-tensor max is its machine's)."""
        with self.local.ledger.kind("local"):
            return np.asarray(self.local.allreduce(np.ascontiguousarray(values, np.float64),
                                                   "max"))

    def regather(self, piece, lo, hi, numel, new_lo, new_hi):
        """A parameter's momentum moves to another cut into shards (a face whose buckets
        change, e.g. DDP's after its first iteration): this rank holds coordinates
        lo .. hi - 1 of it (``piece``, fp32), the machine's ranks hold the rest; returns
        coordinates new_lo .. new_hi - 1, bit for bit (one int32 SUM inside the machine
        of the pieces' bit patterns, each coordinate held by one rank)."""
        full = torch.zeros(numel, dtype=torch.int32, device=piece.device)
        full[lo:hi] = piece.detach().reshape(-1).to(torch.float32).view(torch.int32)
        with self.local.ledger.kind("local"):
            got = self.local.allreduce(full, "sum")
        return got[new_lo:new_hi].view(torch.float32).clone()

    # -- 3-4. the vote among machines, then the whole vote inside the machine ---------------
    def rounds(self, schedule, packed, d_shard, d, span, step, offset, *, backend, name):
        """The rounds of one bucket's vote (a generator for ``VoteHandle``): the
        schedule's vote of this rank's shard among the machines (skipped when the shard
        is empty: it is on every machine), then an allgather of the voted shards on the
        machine's transport (channel 2); returns the ``Vote`` of the whole bucket.  The
        allgather is never posted by the first step of the generator (``start``), so a
        driver that finishes buckets in order posts every machine's allgathers in bucket
        order on every rank, empty shards or not."""
        mask = schedule.rule.has_zeros(self.machines)
        if d_shard:
            vote = yield from schedule.rounds(packed, d_shard, step, offset, backend=backend,
                                              name=name)
        else:  # post the gather in finish(), as the machine's other ranks do: in bucket order
            yield _READY
        row_bytes, m = span // 8, K.packed_nbytes(d_shard)
        row = backend.zeros(row_bytes * (2 if mask else 1), packed)
        if d_shard:
            row[:m] = vote.bits[:m]
            if mask:
                if vote.nonzero is not None:
                    row[row_bytes:row_bytes + m] = vote.nonzero[:m]
                else:
                    row[row_bytes:row_bytes + m] = 0xFF
                    if d_shard % 8:
                        row[row_bytes + m - 1] = (1 << (d_shard % 8)) - 1
        with self.local.ledger.kind("local"):
            posted = self.local.start_allgather_rows(row, channel=2, name=f"{name}.machine")
        rows = yield posted          # k rows, maybe views of the peers' memory: copied here
        nbytes = K.packed_nbytes(d)
        bits = backend.cat([r[:row_bytes] for r in rows])[:nbytes]
        nonzero = backend.cat([r[row_bytes:] for r in rows])[:nbytes] if mask else None
        return K.Vote(bits, nonzero)


class _Ready:
    """A round with nothing to wait for (a handle that has finished)."""

    def test(self):
        return True

    def wait(self):
        return None


_READY = _Ready()


def _as_bytes(a):
    return a.view(torch.uint8) if isinstance(a, torch.Tensor) else a.view(np.uint8)


def _as_float32(a):
    a = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return a.contiguous().view(torch.float32)


def make_hierarchy(transport, hierarchy=None, ranks_per_node=None):
    """The ``Hierarchy`` of ``transport``'s ranks (None for a flat vote).  Collective: a
    rank that asks for another layout gets ``RankMismatchError``, machines of different
    sizes a ``ValueError``, on every rank."""
    spec = check_options(hierarchy, ranks_per_node)
    if spec is None:
        return None
    with transport.ledger.kind("control"):
        transport.agree({"hierarchy": spec}, what="the hierarchical vote's layout (every rank "
                        "must pass the same hierarchy= / ranks_per_node=)")
        key = transport.rank // int(ranks_per_node) if ranks_per_node else transport.host_id()
        keys = np.asarray(transport.allgather(np.array([key], np.int64).view(np.uint8)))
    keys = keys.reshape(-1).view(np.int64).tolist()
    return hierarchy_from_keys(transport, keys, spec)


def hierarchy_from_keys(transport, keys, spec):
    """The ``Hierarchy`` where ranks whose ``keys`` (one per rank, the same list on every
    rank) are equal share a machine; machines are numbered by their lowest rank, local
    ranks in rank order.  Machines of different sizes: ``ValueError`` on every rank (each
    computes it from the same list)."""
    order = list(dict.fromkeys(keys))            # machines by their lowest rank
    members = {m: [r for r, key in enumerate(keys) if key == m] for m in order}
    sizes = [len(members[m]) for m in order]
    if len(set(sizes)) > 1:
        desc = ", ".join(f"machine {j} (ranks {_ranks(members[m])}): {len(members[m])}"
                         for j, m in enumerate(order))
        raise ValueError(f"hierarchical vote ({spec}) on {len(keys)} ranks: the machines hold "
                         f"different numbers of ranks ({desc}); every machine must hold the "
                         "same number k of ranks (launch k ranks per machine, or for "
                         "ranks_per_node=k a world size that k divides)")
    key = keys[transport.rank]
    machine, local_rank = order.index(key), members[key].index(transport.rank)
    tag = (spec, tuple(keys))
    local = transport.split(machine, local_rank, tag=("local",) + tag)
    cross = transport.split(local_rank, machine, tag=("cross",) + tag)
    return Hierarchy(transport, local, cross, spec)


def _ranks(rs):
    return f"{rs[0]}..{rs[-1]}" if rs == list(range(rs[0], rs[-1] + 1)) and len(rs) > 2 \
        else ",".join(map(str, rs))
