"""The common R of the sr / s1 compressors through Horovod, on 4 ranks whose gradients
differ in scale.  Run under ``horovodrun -np 4`` (tests/test_compressors_common_r.py).

Usage: hvd_common_r.py STEPS M

Part 1 (statistics): one parameter of 3 * M coordinates whose gradient is fixed per rank,
the issue's example tiled M times: ranks 0-1 send g = [1, 1, 0.5], ranks 2-3
g = [-3, 10, -0.2] (mean [-1, 5.5, 0.15]).  A DistributedOptimizer (lr = 0) steps STEPS
times with SRCompressor() / S1Compressor() (the default: common R), with R="local", and
with the module-level ``Compression.sr`` / ``.s1``; each rank records the decompressed
output of every step, averaged over the M copies of each of the 3 coordinates, and the R
its S_R used.

Part 2 (the rules): a model with a tensor whose gradient appears only at step 3 (before
it Horovod allreduces zeros for it), a tensor whose gradient jumps 100x at step 5, and a
steady one; then ``hvd.grouped_allreduce`` (no tensor names: identity by size and index)
with a tensor that first appears at step 3.  Each rank records per step and tensor: its
gradient, the output, the R it used, and the clamps it counted.
"""
import sys

import numpy as np
import torch

import horovod.torch as hvd
import compressors as C
from harness import save_result

hvd.init()
torch.set_num_threads(1)
n, rank = hvd.size(), hvd.rank()
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
M = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
out = {}
assert n == 4, "the example is for 4 ranks"


def recording(cls):
    class Recording(cls):
        """``cls`` that remembers, per compress, the R used and the clamps counted."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.log = []

        def compress(self, tensor):
            before = self.stats["clamped_common"]
            w, ctx = super().compress(tensor)
            ctx.clamped_now = self.stats["clamped_common"] - before
            ctx.g = tensor.detach().float().numpy().ravel().copy()
            return w, ctx

        def decompress(self, tensor, ctx):
            res = super().decompress(tensor, ctx)
            self.log.append(dict(key=ctx.key, step=ctx.step, d=ctx.d, g=ctx.g,
                                 o=res.detach().float().numpy().ravel().astype(np.int8),
                                 r=np.nan if ctx.r is None else ctx.r,
                                 clamped=ctx.clamped_now))
            return res

    Recording.__name__ = cls.__name__
    return Recording


# --- part 1: E[o] under the common R and under local R --------------------------------
pattern = np.array([1.0, 1.0, 0.5]) if rank < 2 else np.array([-3.0, 10.0, -0.2])
G = torch.tensor(np.tile(pattern, M), dtype=torch.float32)
CONFIGS = {
    "sr_common": lambda: C.SRCompressor(seed=11),
    "s1_common": lambda: C.S1Compressor(seed=12),
    "sr_local": lambda: C.SRCompressor(seed=13, R="local"),
    "s1_local": lambda: C.S1Compressor(seed=14, R="local"),
    "sr_default": lambda: C.Compression.sr,      # the ready-made instances, no options
    "s1_default": lambda: C.Compression.s1,
}
for name, make in CONFIGS.items():
    w = torch.nn.Parameter(torch.zeros(3 * M))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0),
                                   named_parameters=[(f"{name}.w", w)], compression=make())
    means, rs = [], []
    for t in range(STEPS):
        opt.zero_grad()
        (w * G).sum().backward()
        opt.synchronize()
        means.append(w.grad.detach().numpy().reshape(M, 3).mean(axis=0))
        with opt.skip_synchronize():
            opt.step()
    comp = opt._compression
    out[f"{name}|mean"] = np.array(means)            # (STEPS, 3): per-step means
    out[f"{name}|stats"] = np.array([comp.stats[k] for k in
                                     ("r_first", "clamped_common", "r_mismatch")])
    out[f"{name}|bound"] = np.array(list(comp.bounds().values()) if comp.common else [np.nan])

# --- part 2: first step, a late tensor, a 100x jump, through a DistributedOptimizer ---


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.steady = torch.nn.Parameter(torch.zeros(1000))
        self.late = torch.nn.Parameter(torch.zeros(777))
        self.jump = torch.nn.Parameter(torch.zeros(500))


for kind, cls in (("sr", C.SRCompressor), ("s1", C.S1Compressor)):
    model = Model()            # one per optimizer: each registers its own hooks
    named = list(model.named_parameters())
    comp = recording(cls)(seed=21 if kind == "sr" else 22)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=[(f"{kind}.{k}", v) for k, v in named],
                                   compression=comp)
    for t in range(STEPS // 3):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(1000 * t + rank)
        scale = 0.5 + rank                       # ranks differ in scale
        loss = (model.steady * torch.randn(1000, generator=gen) * scale).sum()
        jump = 100.0 if t >= 5 else 1.0
        loss = loss + (model.jump * torch.randn(500, generator=gen) * scale * jump).sum()
        if t >= 3:
            loss = loss + (model.late * torch.randn(777, generator=gen) * scale).sum()
        loss.backward()
        opt.step()
    for rec in comp.log:
        nm = rec["key"][1].split(".", 1)[1]
        for f in ("g", "o", "r", "clamped"):
            out.setdefault(f"opt|{kind}|{nm}|{f}", []).append(rec[f])
    out[f"opt|{kind}|stats"] = np.array([comp.stats[k] for k in
                                         ("r_first", "clamped_common", "r_mismatch")])

# --- part 2b: hvd.grouped_allreduce (identity by size and index), a tensor from step 3 -
comp = recording(C.S1Compressor)(seed=31)
for t in range(8):
    gen = torch.Generator().manual_seed(7000 + 100 * t + rank)
    ts = [torch.randn(300, generator=gen) * (1 + rank), torch.randn(300, generator=gen)]
    if t >= 3:
        ts.append(torch.randn(333, generator=gen) * (3 - rank))
    hvd.grouped_allreduce(ts, compression=comp)
for rec in comp.log:
    tag = f"grp|{rec['d']}.{rec['key'][2]}"
    for f in ("g", "o", "r"):
        out.setdefault(f"{tag}|{f}", []).append(rec[f])
out["grp|stats"] = np.array([comp.stats[k] for k in ("r_first", "clamped_common",
                                                      "r_mismatch")])

out = {k: np.array(v) for k, v in out.items()}
out["rank"] = np.array(rank)
save_result(**out)
