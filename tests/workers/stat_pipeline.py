"""Statistics of the whole vote pipeline on n heterogeneous ranks (tests/test_statistics.py).

Every rank builds its own input (different mean and scale per rank, from
``stat_inputs``) replicated ``T`` times in one flat buffer of three tensors (segments):
A (the heterogeneous values), Z (zeros: R = 0) and C (50 x A: another R).  Replica t of
coordinate k sits at position t*m + k, so one vote gives T independent draws of every
coordinate (the streams are counter-based: distinct positions, independent bits).
For each schedule and vote rule the rank saves, per segment, the mean of o and the
share of o = +1 and of o = 0 over the replicas, and a crc32 of the vote bits (the test
checks that every rank has the same vote).

Also saved: this rank's own packed S_R contribution of a large buffer (the test checks
that the variance of the mean over ranks is 1/n: independent streams), and the votes of
``S`` consecutive steps on a small buffer (correlation across steps and neighbours).

    mpirun -np n python -m mpi4py stat_pipeline.py T S
"""
import sys
import zlib

import numpy as np

from harness import save_result
from signcomm.comm import get_transport
from signcomm.vote import SCHEDULES, SignVote
from stat_inputs import M, M_ZERO, SCALE_C, SEED, rank_values

T, S = int(sys.argv[1]), int(sys.argv[2])
t = get_transport("mpi")
rank, n = t.rank, t.size

a = rank_values(rank, n)
v = np.concatenate([np.tile(a, T), np.zeros(T * M_ZERO, np.float32), np.tile(a * SCALE_C, T)])
seg = [T * M, T * M_ZERO, T * M]
starts = np.cumsum([0] + seg)
RULES = [("v1", "coin"), ("v1", "zero"), ("v2", "coin")]

out = {}
for sched in SCHEDULES:
    for variant, tie in RULES:
        name = f"{sched}-{variant}-{tie}"
        sv = SignVote(t, schedule=sched, variant=variant, tie=tie, seed=SEED, R="global")
        vote = sv(v, 5, seg_sizes=seg)
        o = vote.values(v.size)
        out[name + "-crc"] = zlib.crc32(vote.bits.tobytes()) ^ (
            zlib.crc32(vote.nonzero.tobytes()) if vote.nonzero is not None else 0)
        for s, label in enumerate("AZC"):
            oo = o[starts[s]:starts[s + 1]].reshape(T, -1)
            out[f"{name}-{label}-mean"] = oo.mean(0)
            out[f"{name}-{label}-plus"] = (oo > 0).mean(0)
            out[f"{name}-{label}-zero"] = (oo == 0).mean(0)
        out[f"{name}-R"] = np.asarray(sv.last_r, np.float64)

# each rank's own S_R contribution (variance of the mean over ranks: independent streams)
sv = SignVote(t, schedule="allgather", variant="v1", seed=SEED, R="global")
out["contribution"] = sv.pack(np.tile(a, T), 9)
out["contribution-R"] = np.asarray(sv.last_r, np.float64)

# S consecutive steps on a small buffer: o_t for every step (packed), v1 and v2
small = np.tile(a, 128)
for variant in ("v1", "v2"):
    sv = SignVote(t, schedule="allgather", variant=variant, seed=SEED, R="global")
    out[f"steps-{variant}"] = np.stack([sv(small, step).bits for step in range(S)])
save_result(rank=rank, size=n, **out)
