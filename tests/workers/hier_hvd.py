"""The hierarchical vote over Horovod (dynamic process sets), 4 ranks under horovodrun
(tests/test_hierarchy.py): MVSM on 2 machines x 2 ranks and on the host (Horovod's node:
one machine of 4 here)."""
import numpy as np
import torch

import horovod.torch as hvd
import hier_problem as P
import signcomm
from harness import save_result

torch.set_num_threads(1)
hvd.init()
rank = hvd.rank()
out = {}
for tag, method, schedule, layout in (
        ("2x2-mvsm-v2-sharded", "mvsm-v2", "sharded", dict(ranks_per_node=2)),
        ("host-mvsm-v1-allreduce", "mvsm-v1", "allreduce", dict(hierarchy="host"))):
    params = P.init_params()
    opt = signcomm.create_optimizer(method, list(params.values()), lr=P.LR, seed=P.SEED,
                                    schedule=schedule, transport="horovod",
                                    bucket_elements=P.BUCKET, **layout)
    traj = []
    for t in range(P.STEPS):
        grads = P.rank_grads(params, rank, t)
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        traj.append(P.flat(params))
    out[tag] = np.stack(traj)
    out[f"layout-{tag}"] = [opt.hierarchy.machines, opt.hierarchy.k]
save_result(**out)
