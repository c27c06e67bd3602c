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
    out[tag], opt, _ = P.train(method, schedule, lambda p, t: P.rank_grads(p, rank, t),
                               transport="torch", **layout)
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


def ddp_train(method, schedule, steps, first=0, params=None, hook_state=None):
    """(trajectory, hook state, parameters) of DDP + hook (2 x 2) + SGD(lr)."""
    model = Model()
    if params is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    state = signcomm.ddp.register(ddp, method, seed=P.SEED, schedule=schedule, ranks_per_node=2)
    if hook_state is not None:
        state.load_state_dict(hook_state)
    opt = torch.optim.SGD(ddp.parameters(), lr=P.LR)
    traj = []
    for t in range(first, first + steps):
        now = {k: v.detach() for k, v in dict(model.named_parameters(), unused=unused).items()}
        grads = P.rank_grads(now, rank, t)
        opt.zero_grad()
        ddp(grads).backward()
        opt.step()
        traj.append(P.flat({k: v.detach() for k, v in
                            dict(model.named_parameters(), unused=unused).items()}))
    return np.stack(traj), state, {k: v.detach().clone() for k, v in model.named_parameters()}


for tag, method, schedule in (("ddp-2x2-mvsm-v1-sharded", "mvsm-v1", "sharded"),
                              ("ddp-2x2-mvsm-v2-allgather", "mvsm-v2", "allgather")):
    out[tag], state, _ = ddp_train(method, schedule, P.STEPS)
    layout = state.layout_record()
    out[f"layout-{tag}"] = [layout["machines"], layout["ranks_per_node"]]
    out[f"cross-{tag}"] = state.stats["cross_bytes_sent"]
# the hook's checkpoint: stop after 2 steps, resume in a new DDP model (whose buckets are
# rebuilt again: the loaded pieces move), compare with the run that went on
_, state, params = ddp_train("mvsm-v1", "sharded", 2)
saved = state.state_dict()
out["ddp-resumed"] = ddp_train("mvsm-v1", "sharded", P.STEPS - 2, first=2, params=params,
                               hook_state=saved)[0]
save_result(**out)
dist.destroy_process_group()
