"""The hierarchical vote over torch.distributed (gloo), 4 ranks started with torchrun's
environment (tests/test_hierarchy.py): 2 machines x 2 ranks for v1 and v2, and the host
(LOCAL_RANK / LOCAL_WORLD_SIZE: one machine of 4 here)."""
import numpy as np
import torch
import torch.distributed as dist

import hier_problem as P
import signcomm
from harness import save_result

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
out = {}
for tag, method, schedule, layout in (
        ("2x2-mvsm-v1-sharded", "mvsm-v1", "sharded", dict(ranks_per_node=2)),
        ("2x2-mvsm-v2-allreduce", "mvsm-v2", "allreduce", dict(ranks_per_node=2)),
        ("host-mvsm-v1-allgather", "mvsm-v1", "allgather", dict(hierarchy="host"))):
    params = P.init_params()
    opt = signcomm.create_optimizer(method, list(params.values()), lr=P.LR, seed=P.SEED,
                                    schedule=schedule, transport="torch",
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
dist.destroy_process_group()
