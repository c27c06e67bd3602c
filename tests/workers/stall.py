"""A rank stops stepping while the others go on: the stall detector must end the job.

argv: case ("extra-step": rank 0 steps once more than the others, which return;
"sys-exit": the last rank calls sys.exit(1) between steps; "return": the last rank
leaves the loop early and returns normally).  Run with SIGNCOMM_STALL_SECONDS small."""
import sys

import torch

import signcomm

case = sys.argv[1]
w = torch.nn.Parameter(torch.ones(1000))
opt = signcomm.MVSM([w], lr=0.01, transport="mpi")
rank, n = opt.transport.rank, opt.transport.size
steps = 3 + (1 if (case == "extra-step" and rank == 0) else 0)
for step in range(steps):
    if case in ("sys-exit", "return") and rank == n - 1 and step == 2:
        if case == "sys-exit":
            sys.exit(1)
        break
    w.grad = torch.randn(1000)
    opt.step()
print(f"rank {rank} done after {steps} steps", flush=True)
