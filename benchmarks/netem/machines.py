"""Rank side of the machine proof (``cluster.py --check --ranks-per-machine k``).

    python -m mpi4py machines.py NBYTES OUT_JSON

Every rank reports the world ranks of its ``MPI.COMM_TYPE_SHARED`` communicator and the
inode of its network namespace.  Then rank 0 sends NBYTES of random bytes twice, timed
from the send to the receiver's one-byte acknowledgement: to rank 1 (on its own machine
when k >= 2: the bytes should go through shared memory, so neither ``eth0`` nor ``lo``
of the namespace moves) and to the first rank of the next machine (across the shaped
link: ``eth0`` carries them).  Around each transfer rank 0 reads its namespace's
``eth0`` and ``lo`` byte counters.  Rank 0 writes everything to OUT_JSON.
"""
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_bench import nic_bytes  # noqa: E402


def nic():
    out = {}
    for dev in ("eth0", "lo"):
        out[f"{dev}_tx"], out[f"{dev}_rx"] = nic_bytes(dev)
    return out


def transfer(comm, buf, ack, dest):
    """Rank 0 -> dest; returns (seconds, counter deltas) on rank 0, None elsewhere."""
    rank = comm.Get_rank()
    comm.Barrier()
    res = None
    if rank == 0:
        c0 = nic()
        t0 = time.perf_counter()
        comm.Send(buf, dest=dest, tag=7)
        comm.Recv(ack, source=dest, tag=8)
        dt = time.perf_counter() - t0
        c1 = nic()
        res = {"dest": dest, "seconds": dt, **{k: c1[k] - c0[k] for k in c0}}
    elif rank == dest:
        comm.Recv(buf, source=0, tag=7)
        comm.Send(ack, dest=0, tag=8)
    comm.Barrier()
    return res


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    nbytes, out = int(sys.argv[1]), sys.argv[2]
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, 0)
    members = shared.allgather(rank)
    k = shared.Get_size()
    groups = comm.gather(members, root=0)
    netns = comm.gather(os.stat("/proc/self/ns/net").st_ino, root=0)
    buf = np.random.default_rng(rank).integers(0, 256, nbytes, dtype=np.uint8)
    ack = np.zeros(1, np.uint8)
    intra = transfer(comm, buf, ack, 1) if size > 1 else None
    cross_dest = k if k < size else None
    cross = transfer(comm, buf, ack, cross_dest) if cross_dest is not None else None
    if rank == 0:
        with open(out + ".tmp", "w") as f:
            json.dump({"nbytes": nbytes, "size": size, "groups": groups,
                       "netns": netns, "intra": intra, "cross": cross}, f)
        os.replace(out + ".tmp", out)
    shared.Free()


if __name__ == "__main__":
    main()
