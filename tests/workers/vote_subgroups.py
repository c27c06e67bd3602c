"""Votes inside a subgroup: an MPI sub-communicator (even world ranks) and a Horovod
process set of the same ranks.  Inputs are rank_input(world rank); streams are keyed by
the rank inside the group."""
import numpy as np
from mpi4py import MPI

import horovod.torch as hvd
from harness import save_result
from signcomm.comm import get_transport
from signcomm.vote import SignVote
from vote_oracle import SEED, STEP, rank_input

world = MPI.COMM_WORLD.Get_rank()
evens = hvd.ProcessSet(list(range(0, MPI.COMM_WORLD.Get_size(), 2)))
hvd.init(process_sets=[evens])
sub = MPI.COMM_WORLD.Split(color=world % 2, key=world)
out = dict(world=world)
if world % 2 == 0:
    for name, t in (("mpi", get_transport("mpi", comm=sub)),
                    ("horovod", get_transport("horovod", process_set=evens))):
        for sched in ("allgather", "sharded", "allreduce"):
            vote = SignVote(t, schedule=sched, R="global", seed=SEED)(rank_input(world, 1001), STEP, offset=3)
            out[f"{name}-{sched}"] = vote.bits
        out[f"{name}-size"] = t.size
hvd.barrier()
save_result(**out)
