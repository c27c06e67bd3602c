"""The hierarchical vote over torch.distributed (gloo), 4 ranks started with torchrun's
environment (tests/test_hierarchy.py): MVSM on 2 machines x 2 ranks for v1 and v2, and
the host (LOCAL_RANK / LOCAL_WORLD_SIZE: one machine of 4 here); the DDP hook with
ranks_per_node=2 and SGD(lr), tiny DDP buckets (rebuilt after the first iteration, so
the momentum's pieces move between the machine's ranks)."""
import numpy as np
import torch
import torch.distributed as dist

import hier_problem as P
import signcomm
import signcomm.ddp
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

# the DDP hook with ranks_per_node=2, then SGD(lr): x <- x - lr o
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, t in P.init_params().items():
            if name != "unused":
                self.register_parameter(name, torch.nn.Parameter(t.clone()))

    def forward(self, grads):  # d loss / d p = grads[p] exactly
        return sum((p * grads[k]).sum() for k, p in self.named_parameters())


unused = P.init_params()["unused"]
for tag, method, schedule in (("ddp-2x2-mvsm-v1-sharded", "mvsm-v1", "sharded"),
                              ("ddp-2x2-mvsm-v2-allgather", "mvsm-v2", "allgather")):
    model = Model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    state = signcomm.ddp.register(ddp, method, seed=P.SEED, schedule=schedule, ranks_per_node=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=P.LR)
    traj = []
    for t in range(P.STEPS):
        now = dict(model.named_parameters(), unused=unused)
        grads = P.rank_grads({k: v.detach() for k, v in now.items()}, rank, t)
        opt.zero_grad()
        loss = ddp(grads)
        loss.backward()
        opt.step()
        traj.append(P.flat({k: v.detach() for k, v in
                            dict(model.named_parameters(), unused=unused).items()}))
    out[tag] = np.stack(traj)
    out[f"layout-{tag}"] = [state.layout_record()["machines"], state.layout_record()["ranks_per_node"]]
    out[f"cross-{tag}"] = state.stats["cross_bytes_sent"]
save_result(**out)
dist.destroy_process_group()
