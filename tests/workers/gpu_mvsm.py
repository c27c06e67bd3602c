"""MVSM on CUDA parameters over real ranks that share one GPU (and the same run on CPU).

argv: none.  Saves per rank ``cuda-<method>`` and ``cpu-<method>``: flat parameters after
each step of the optimizer problem (tests/optim_oracle.py), the CUDA run with the torch
backend on ``cuda:0``, the CPU run with the numba backend."""
import numpy as np
import torch

from harness import save_result

import signcomm
from optim_oracle import SPECS, batch, init_params, loss_fn
from signcomm.comm import get_transport

T = get_transport("mpi")
STEPS = 6


def run(method, device, schedule):
    params = {k: torch.nn.Parameter(v.to(device)) for k, v in init_params(3).items()}
    order = [params[name] for name, _ in SPECS]
    opt = signcomm.create_optimizer(method, order, lr=0.05, transport=T, seed=2, schedule=schedule,
                                    bucket_elements=40)
    traj = []
    for step in range(STEPS):
        for p in order:
            p.grad = None
        x, y = batch(T.rank, step, True)
        loss_fn({k: p for k, p in params.items() if k != "unused"}, x.to(device), y.to(device)).backward()
        opt.step()
        traj.append(torch.cat([p.detach().float().reshape(-1).cpu() for p in order]).numpy())
    return np.stack(traj)


out = {}
for method, schedule in (("sto-signsgd", "allgather"), ("signsgd-mv", "sharded"),
                         ("mvsm-v1", "sharded"), ("mvsm-v2", "allreduce")):
    out[f"cuda-{method}"] = run(method, "cuda:0", schedule)
    out[f"cpu-{method}"] = run(method, "cpu", schedule)
save_result(**out)
