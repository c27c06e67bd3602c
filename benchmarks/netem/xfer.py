"""Rank side of the link proof: rank 0 sends N bytes to rank 1, REPS times.

    python -m mpi4py xfer.py NBYTES REPS OUT_JSON

Rank 0 times each transfer from the start of its send until rank 1's one-byte
acknowledgement of the complete message arrives (so a rank descheduled after the barrier
cannot shorten it) and writes {"nbytes", "seconds": [...], "processor": ...} to OUT_JSON.  Any other rank only joins the
barriers.  The payload is random so no layer can compress it away.
"""
import json
import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
nbytes, reps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
buf = np.random.default_rng(rank).integers(0, 256, nbytes, dtype=np.uint8)
ack = np.zeros(1, np.uint8)
comm.Barrier()
times = []
for _ in range(max(1, min(reps, 100))):
    comm.Barrier()
    if rank == 0:
        t0 = time.perf_counter()
        comm.Send(buf, dest=1, tag=7)
        comm.Recv(ack, source=1, tag=8)
        times.append(time.perf_counter() - t0)
    elif rank == 1:
        comm.Recv(buf, source=0, tag=7)
        comm.Send(ack, dest=0, tag=8)
    comm.Barrier()
if rank == 0:
    with open(out + ".tmp", "w") as f:
        json.dump({"nbytes": nbytes, "seconds": times, "processor": MPI.Get_processor_name(),
                   "mpi": MPI.Get_library_version().splitlines()[0]}, f)
    import os
    os.replace(out + ".tmp", out)
