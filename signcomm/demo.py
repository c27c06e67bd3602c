"""A short demo of the engine: `mpirun -np 4 python -m signcomm.demo`.

Every rank draws its own noisy copy of one hidden vector, packs its signs (1 bit per
coordinate), and the ranks vote with each schedule.  Rank 0 prints how often the vote
recovers the hidden signs and the bytes moved, next to what an fp32 allreduce moves."""
from __future__ import annotations

import argparse

import numpy as np

from .comm import get_transport, ring_allreduce_bytes
from .vote import SCHEDULES, SignVote


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d", type=int, default=1_000_000, help="coordinates")
    ap.add_argument("--noise", type=float, default=3.0, help="noise std per rank")
    args = ap.parse_args(argv)
    t = get_transport("mpi")
    n, d = t.size, args.d
    truth = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    mine = truth + args.noise * np.random.default_rng(1 + t.rank).standard_normal(d).astype(np.float32)
    alone = float(((mine > 0) == (truth > 0)).mean())
    if t.rank == 0:
        print(f"{n} ranks, d = {d:,}: each rank's own signs match the truth on {alone:.1%}")
    for sched in SCHEDULES:
        t.ledger.begin_step(sched)
        vote = SignVote(t, schedule=sched)(mine, step=0)
        o = vote.values(d)
        s = t.ledger.summary(sched)
        if t.rank == 0:
            print(f"  {sched:9s} vote matches the truth on {float((o == np.sign(truth)).mean()):.1%}; "
                  f"bytes sent/received per rank {s.data_bytes_sent:,}/{s.data_bytes_received:,} "
                  f"(fp32 allreduce: {ring_allreduce_bytes(4 * d, n):,})")


if __name__ == "__main__":
    main()
