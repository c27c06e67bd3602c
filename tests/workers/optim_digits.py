"""Convergence sanity on a small real problem: sklearn's digits (1797 8x8 images, bundled
with scikit-learn), a 64-32-10 MLP, each rank its own shard of the training set and its
own minibatches.  argv: steps, batch per rank, split ("iid": a random shard per rank;
"label": rank r holds the digits d with d % n == r, the heterogeneous case), a seed
(minibatch draws and the optimizer's random streams; the initial model is fixed), then runs
as ``method:lr[:beta]``.  Saves
per run the full-training-set loss every 10 steps (identical on every rank)."""
import sys

import numpy as np
import torch

torch.set_num_threads(1)

from harness import save_result  # noqa: E402

import signcomm  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

steps, per_rank, split, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
runs = sys.argv[5:]

X, y = load_digits(return_X_y=True)
X = torch.tensor((X / 16.0 - 0.5) * 2, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.int64)


def build():
    torch.manual_seed(0)  # the same initial model on every rank and for every run
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


out = {}
for spec in runs:
    method, lr, *beta = spec.split(":")
    model = build()
    opts = {"beta": float(beta[0])} if beta else {}
    opt = signcomm.create_optimizer(method, model.parameters(), lr=float(lr), seed=seed, **opts)
    rank, n = opt.transport.rank, opt.transport.size
    if split == "iid":
        shard = np.random.default_rng(0).permutation(len(y))[rank::n]  # this rank's data
    else:
        shard = np.flatnonzero(y.numpy() % n == rank)
    draw = np.random.default_rng([seed, rank])
    curve = []
    for step in range(steps + 1):
        if step % 10 == 0:
            with torch.no_grad():
                curve.append(float(torch.nn.functional.cross_entropy(model(X), y)))
        if step == steps:
            break
        idx = torch.from_numpy(shard[draw.integers(0, len(shard), per_rank)])
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    out[spec] = np.array(curve)
save_result(**out)
