"""Each rank packs its own signs, all ranks gather them, vote, and report."""
import sys

import numpy as np
from mpi4py import MPI

from harness import save_result
from signcomm import kernels as K

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
d = int(sys.argv[1])
x = np.random.default_rng(100 + rank).standard_normal(d).astype(np.float32)
mine = K.pack_signs(x)
gathered = np.empty((n, mine.size), np.uint8)
comm.Allgather(mine, gathered)
key = K.key64(0, K.stream_id(K.Purpose.TIE_COIN), 0)
vote = K.majority_vote(gathered, d, key=key)
extra = {}
if "--horovod" in sys.argv:
    import horovod.torch as hvd
    hvd.init()
    extra = dict(hvd_rank=hvd.rank(), hvd_size=hvd.size(), mpi_enabled=hvd.mpi_enabled())
save_result(x=x, vote=vote.bits, **extra)
