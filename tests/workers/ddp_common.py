"""Shared by the DDP workers: a model of awkward tensor sizes with a parameter that gets
no gradient, per-rank data, and one run of DDP + signcomm hook + SGD(lr) next to
signcomm's optimizer on the same data (the oracle contract, docs/ddp.md)."""
import copy
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)

import signcomm  # noqa: E402
import signcomm.ddp  # noqa: E402

LR = 0.01

# (method, options, find_unused_parameters): every v1/v2 member, every schedule, R
# global / local / fixed, tie coin / zero, with and without a parameter that gets no
# gradient (find_unused_parameters=True: the hook defers the votes to the last bucket)
CASES = [
    ("mvsm-v1", dict(schedule="allgather", seed=1), True),
    ("mvsm-v1", dict(schedule="sharded", R="local", tie="zero", seed=2), False),
    ("mvsm-v1", dict(schedule="allreduce", tie="zero", beta=0.3), True),
    ("mvsm-v1", dict(schedule="sharded", R=0.05, seed=3), False),
    ("mvsm-v2", dict(schedule="allgather", R="local"), False),
    ("mvsm-v2", dict(schedule="sharded", seed=4), True),
    ("mvsm-v2", dict(schedule="allreduce", beta=0.5), False),
    ("signsgd-mv", dict(schedule="sharded", tie="zero"), True),
    ("signum-mv", dict(schedule="allgather", beta=0.2), False),
    ("sto-signsgd", dict(schedule="allreduce", R="local"), True),
    ("mv-sto-signsgd-sim", dict(schedule="sharded", seed=5), False),
    ("mvsm-v1", dict(schedule="sharded", tie="coin", R="global"), True),
]


def init():
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


class Awkward(nn.Module):
    """Tensors of 1, 9, 17, 4, ... and 871 coordinates (not multiples of 8 or 64), and
    ``unused`` (between used ones in parameter order) which never gets a gradient."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Linear(13, 67)
        self.scale = nn.Parameter(torch.ones(1))
        self.mid = nn.Linear(67, 17)
        self.skip = nn.Parameter(0.1 * torch.randn(17, 1, generator=g))
        self.unused = nn.Linear(5, 3)
        self.head = nn.Linear(17, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.emb(x)) * self.scale
        h = torch.relu(self.mid(h)) + self.skip.reshape(-1)
        return self.head(h)


def batch(rank, step, case=0, size=6):
    g = torch.Generator().manual_seed(1000 * case + 100 * rank + step)
    x = torch.randn(size, 13, generator=g)
    y = torch.randint(0, 4, (size,), generator=g)
    return x, y


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).numpy().copy()


def pair(find_unused, cap, dtype=torch.float32, **ddp_options):
    """(ddp model, plain model) with the same parameters; ``unused`` frozen unless DDP
    is told to find unused parameters (DDP without it refuses a parameter that gets no
    gradient; a frozen parameter has none in the optimizer either)."""
    base = Awkward(dtype=dtype)
    if not find_unused:
        base.unused.requires_grad_(False)
    plain = copy.deepcopy(base)
    ddp = DDP(base, bucket_cap_mb=cap, find_unused_parameters=find_unused, **ddp_options)
    return ddp, plain


def oracle(method, opts, *, rank, case, steps=20, find_unused=True, cap=0.002,
           accumulate=1, transport="torch", ddp_options=None, dtype=torch.float32):
    """Run both faces ``steps`` steps; returns (per-step equality, final flat params of
    the DDP face, the hook state, the plain model)."""
    ddp, plain = pair(find_unused, cap, dtype, **(ddp_options or {}))
    state = signcomm.ddp.register(ddp, method, **opts)
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
    opt = signcomm.create_optimizer(method, plain.parameters(), lr=LR, transport=transport,
                                    **opts)
    eq, buckets = [], []
    for t in range(steps):
        sgd.zero_grad()
        opt.zero_grad()
        for k in range(accumulate):
            x, y = batch(rank, t * accumulate + k, case)
            x = x.to(dtype)
            if k < accumulate - 1:
                with ddp.no_sync():
                    loss_of(ddp, x, y).backward()
            else:
                loss_of(ddp, x, y).backward()
            loss_of(plain, x, y).backward()
        sgd.step()
        opt.step()
        eq.append(np.array_equal(flat(ddp.module).view(np.uint32), flat(plain).view(np.uint32)))
        buckets.append(state.buckets)
    assert state.step == steps, (state.step, steps)
    return np.array(eq), flat(ddp.module), state, buckets


def threads():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
