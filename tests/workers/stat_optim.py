"""The optimizer end to end on n ranks (tests/test_statistics.py).

1. Short training runs of the options that only had argument checks: R="local", a fixed
   R (small enough to clamp), tie="zero"; softmax regression on digits with label-skewed
   shares (rank j holds the classes y % n == j).  Saved: the full training loss before
   and after, the parameters (the test checks every rank has the same), the clamped count.
2. A parameter whose gradient is always 0 on every rank: its coordinates after 16 and 64
   steps (a random walk of variance lr^2 t; drift 0).

    mpirun -np n python -m mpi4py stat_optim.py STEPS
"""
import sys

import numpy as np
import torch

from harness import ROOT, save_result

sys.path.insert(0, str(ROOT))
import signcomm  # noqa: E402
from mpi_examples.data import load_digits  # noqa: E402

STEPS = int(sys.argv[1])
torch.set_num_threads(1)
ds = load_digits()
X = torch.from_numpy(ds.x_train.reshape(len(ds.y_train), -1))
Y = torch.from_numpy(ds.y_train)

TRAIN = {  # name: (preset, options)
    "v1-local": ("mvsm-v1", dict(R="local", beta=0.1)),
    "v2-local": ("mvsm-v2", dict(R="local")),
    "v1-fixed": ("mvsm-v1", dict(R=0.05, beta=0.1)),
    "v1-tie-zero": ("mvsm-v1", dict(tie="zero", beta=0.1)),
}
out = {}
for name, (preset, options) in TRAIN.items():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = signcomm.create_optimizer(preset, model.parameters(), lr=0.005, seed=3, **options)
    rank, n = opt.transport.rank, opt.transport.size
    mine = np.flatnonzero(ds.y_train % n == rank)  # label-skewed share
    draw = np.random.default_rng([7, rank])
    with torch.no_grad():
        loss0 = float(torch.nn.functional.cross_entropy(model(X), Y))
    clamped = 0
    for step in range(STEPS):
        idx = torch.from_numpy(mine[draw.integers(0, len(mine), 16)])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        clamped += int(opt.stats["clamped"])
    with torch.no_grad():
        loss1 = float(torch.nn.functional.cross_entropy(model(X), Y))
    out[f"{name}-loss"] = np.array([loss0, loss1])
    out[f"{name}-clamped"] = clamped
    out[f"{name}-params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()

WALK = {
    "mvsm-v1": ("mvsm-v1", {}), "mvsm-v1-tie-zero": ("mvsm-v1", dict(tie="zero")),
    "mvsm-v2": ("mvsm-v2", {}), "signsgd-mv": ("signsgd-mv", {}),
}
D, LR = 4096, 0.01
for name, (preset, options) in WALK.items():
    x = torch.nn.Parameter(torch.zeros(D))
    opt = signcomm.create_optimizer(preset, [x], lr=LR, seed=5, **options)
    snaps = []
    for step in range(1, 65):
        x.grad = torch.zeros(D)
        opt.step()
        if step in (16, 64):
            snaps.append(x.detach().numpy().copy())
    out[f"walk-{name}"] = np.stack(snaps)
save_result(**out)
