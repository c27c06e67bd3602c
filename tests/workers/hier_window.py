"""The hierarchical vote's exchanges inside a machine (tests/test_hierarchy.py): through
MPI's shared-memory window when the machine's ranks share memory, else messages.

4 ranks as 2 machines of 2 (``ranks_per_node=2``).  The transport's calls on their own
(three alltoalls and allgathers under one name each, each step's send buffer from
``rows_buffer`` when the transport offers one), then the hierarchical MVSM, recording
which operations the machine's calls were (ledger: "alltoall_shm" / "allgather_shm" on
the window path)."""
import sys

import numpy as np
import torch
from mpi4py import MPI

import hier_problem as P
from harness import save_result
from signcomm.comm import get_transport

torch.set_num_threads(1)
rank = MPI.COMM_WORLD.Get_rank()
out = {}

local = get_transport("mpi").split(rank // 2, rank % 2, tag=("hier-window",))
for step in range(3):
    mine = (np.arange(16).reshape(2, 8) + 16 * rank + 64 * step).astype(np.uint8)
    buf = local.rows_buffer((2, 8), channel=1, name="t.alltoall")
    out[f"alltoall-buffer-{step}"] = buf is not None
    if buf is None:
        buf = mine.copy()
    else:
        buf[...] = mine
    rows = local.start_alltoall_rows(buf, channel=1, name="t.alltoall").wait()
    out[f"alltoall-{step}"] = np.stack([np.asarray(row) for row in rows])
    rows = local.start_allgather_rows(np.full(5, rank + step, np.uint8), channel=2,
                                      name="t.allgather").wait()
    out[f"allgather-{step}"] = np.stack([np.asarray(row) for row in rows])
out["ops"] = ",".join(sorted({rec.op for rec in local.ledger.records}))

for method, schedule in (("mvsm-v1", "sharded"), ("mvsm-v2", "allgather")):
    traj, opt, _ = P.train(method, schedule, lambda p, t: P.rank_grads(p, rank, t),
                           ranks_per_node=2)
    out[f"traj-{method}"] = traj
    # which buckets still hold their own send buffer (released once the window serves)
    out[f"staged-{method}"] = np.array([b is not None for b in opt.engine.layout.staged])
    out[f"ops-{method}"] = ",".join(sorted({rec.op for rec in opt.transport.ledger.records
                                            if rec.kind == "local"}))

save_result(**out)
sys.stdout.flush()
