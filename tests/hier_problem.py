"""The hierarchical vote's test problem (issue 17), shared by tests/workers/hier_vote.py
and tests/test_hierarchy.py: a few fp32 tensors whose sizes put shard boundaries inside
tensors and leave some shards empty (with ``BUCKET`` = 256: buckets of 300, 207 + 5 and
130 coordinates; k = 3 gives the second bucket an empty third shard), synthetic
gradients of a different scale per rank with exact zeros, one tensor whose gradient is
always zero and one with none.

``machine_grads`` restates the contract's machine mean from docs/algorithms.md
("Hierarchical vote") in NumPy, independently of ``signcomm.hierarchy``:
``(((g_0 + g_1) + g_2) + ...) / k`` in fp32 over the machine's ranks m*k .. m*k+k-1."""
import numpy as np
import torch

import signcomm

SHAPES = [("a", (300,)), ("b", (9, 23)), ("c", (5,)), ("z", (130,)), ("unused", (4,))]
BUCKET = 256
LR, SEED, STEPS = 0.05, 5, 4


def init_params():
    g = np.random.default_rng(1)
    return {name: torch.from_numpy((g.standard_normal(shape) * 0.5).astype(np.float32))
            for name, shape in SHAPES}


def rank_grads(params, rank, step):
    """Rank ``rank``'s gradients at ``step`` (name -> fp32 tensor, None for "unused")."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES):
        if name == "unused":
            out[name] = None
            continue
        g = np.random.default_rng([rank, step, i]).standard_normal(shape).astype(np.float32)
        g *= np.float32(1 + rank % 3)
        g += np.float32(0.1) * params[name].float().numpy()
        if name == "z":
            g[...] = 0.0
        g.reshape(-1)[::37] = 0.0
        out[name] = torch.from_numpy(g)
    return out


def machine_grads(params, machine, step, k):
    """The mean over machine ``machine``'s k ranks, summed in local-rank order in fp32."""
    grads = [rank_grads(params, machine * k + i, step) for i in range(k)]
    out = {}
    for name, _ in SHAPES:
        if grads[0][name] is None:
            out[name] = None
            continue
        acc = grads[0][name].numpy().copy()
        for i in range(1, k):
            acc = acc + grads[i][name].numpy()
        out[name] = torch.from_numpy(np.divide(acc, np.float32(k)).astype(np.float32))
    return out


def flat(params):
    return np.concatenate([params[name].detach().float().reshape(-1).numpy()
                           for name, _ in SHAPES])


def train(method, schedule, grad_of, *, transport="mpi", steps=STEPS, params=None,
          opt_state=None, **options):
    """(trajectory, optimizer, parameters) of ``steps`` steps of ``create_optimizer(method,
    ..., **options)`` from ``params`` (default the start; a checkpoint ``opt_state``
    resumes its step), ``grad_of(params, step)`` giving the gradients."""
    params = {k: v.clone() for k, v in (params or init_params()).items()}
    opt = signcomm.create_optimizer(method, list(params.values()), lr=LR, seed=SEED,
                                    schedule=schedule, transport=transport,
                                    bucket_elements=BUCKET, **options)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    traj = []
    for t in range(opt.engine.step, opt.engine.step + steps):
        grads = grad_of(params, t)
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()
        traj.append(flat(params))
    return np.stack(traj), opt, params
