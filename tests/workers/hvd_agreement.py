"""Issue 18 for the compressors, through Horovod (tests/test_compressors_agreement.py).
Run under ``mpirun -np N`` or ``horovodrun -np N`` with N >= 3.

Part 1: ranks whose compressors differ in one setting (kind, seed, tie, R policy, a fixed
R value) allreduce one tensor (``hvd.allreduce(t, compression=...)``, under Sum, Average
and a pre/postscale, so every wire is used) or step a DistributedOptimizer; each rank
records the error it raised.  A case with matched settings records its output, and an
allreduce after all of them shows nobody was left waiting.

Part 2: a DistributedOptimizer (SGD with momentum) trains a small MLP on the digits for
STEPS batches; at batch BAD rank 1 has a NaN (in its input for ``sign``: every gradient;
in one tensor's gradient for the others).  The loop catches the error of ``step()``
(or of ``synchronize()`` + ``step()``), and goes on with ``zero_grad()`` and the next
batch.  The same run without batch BAD is the oracle.  Each rank records the final
parameters of both runs, the errors, and its parameters and momentum just before and
just after the bad step.
"""
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import horovod.torch as hvd
import compressors as C
from harness import save_result
from mlp import MLP

hvd.init()
torch.set_num_threads(1)
n, rank = hvd.size(), hvd.rank()
assert n >= 3, "the cases need 3 ranks or more"
out = {}


def attempt(tag, fn):
    try:
        res = fn()
        out[f"err|{tag}"] = np.array("no error")
        if res is not None:
            out[f"res|{tag}"] = res.float().numpy()
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out[f"err|{tag}"] = np.array(f"{type(e).__name__}: {e}")


# --- part 1: one setting differs on some rank ------------------------------------------
AVG, SUM, PRE = (hvd.Average, 1.0, 1.0), (hvd.Sum, 1.0, 1.0), (hvd.Average, 1 / 3, 3.0)
CASES = {   # name: (this rank's compressor, op, prescale, postscale)
    "kind": (lambda: C.SRCompressor() if rank < 2 else C.S1Compressor(), *AVG),
    "kind_sign_sr": (lambda: C.SRCompressor() if rank == 1 else C.SignCompressor(), *SUM),
    "seed": (lambda: C.SignCompressor(seed=7 if rank == 2 else 0), *PRE),
    "seed_int64": (lambda: C.S1Compressor(seed=2 ** 40 if rank == 0 else 0, wire="int64"),
                   *SUM),
    "tie": (lambda: C.SignCompressor(tie="zero" if rank == 1 else "coin"), *SUM),
    "R_local": (lambda: C.S1Compressor(R="local" if rank == n - 1 else "common"), *AVG),
    "R_value": (lambda: C.SRCompressor(R=0.5 if rank == 0 else 0.25, wire="float64"), *PRE),
    "R_fixed_common": (lambda: C.SRCompressor(R=0.5 if rank == 2 else "common"), *SUM),
    "matched": (lambda: C.S1Compressor(seed=3, R=0.5), *PRE),
}
for i, (tag, (make, op, pre, post)) in enumerate(CASES.items()):
    g = torch.tensor(np.random.default_rng([rank, i]).standard_normal(300), dtype=torch.float32)
    attempt(tag, lambda: hvd.allreduce(g, name=f"case.{tag}", op=op, compression=make(),
                                       prescale_factor=pre, postscale_factor=post))
    if tag == "matched":
        out["matched|g"] = g.numpy()


def optimizer(model, prefix, compression, **opts):
    named = [(f"{prefix}.{k}", v) for k, v in model.named_parameters()]
    return hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                    named_parameters=named, compression=compression, **opts)


def opt_seed():
    """A seed that differs on rank 1, through a DistributedOptimizer (raised by step())."""
    model = MLP()
    opt = optimizer(model, "mm", C.SignCompressor(seed=int(rank == 1)))
    F.cross_entropy(model(torch.randn(8, 64)), torch.arange(8)).backward()
    opt.step()


attempt("opt_seed", opt_seed)
attempt("after", lambda: hvd.allreduce(torch.ones(5), name="after", op=hvd.Sum,
                                       compression=C.SignCompressor()))

# --- part 2: a NaN batch is skipped, training goes on ----------------------------------
STEPS, BAD = 7, 3
X, Y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
Y = torch.tensor(Y, dtype=torch.int64)
KINDS = {"sign": C.SignCompressor, "sr": C.SRCompressor, "s1": C.S1Compressor}
RUNS = {   # name: (kind, how the loop steps, DistributedOptimizer options)
    "sign_step": ("sign", "step", {}),
    "sr_sync_sum": ("sr", "synchronize", dict(op=hvd.Sum)),
    "s1_step": ("s1", "step", {}),
    "s1_groups": ("s1", "step", dict(num_groups=2)),
}


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()


def train(name, kind, how, opts, skip_bad):
    model = MLP()
    opt = optimizer(model, f"{name}.{int(skip_bad)}", KINDS[kind](seed=5), **opts)
    params = list(model.parameters())
    errors, steps_after = [], 0
    for t in range(STEPS):
        if skip_bad and t == BAD:
            continue
        idx = np.random.default_rng([rank, t]).choice(np.arange(len(X))[rank::n], 32,
                                                      replace=False)
        xb, yb = X[idx].clone(), Y[idx]
        bad = not skip_bad and t == BAD and rank == 1
        if bad and kind == "sign":
            xb[0, 5] = float("nan")
        hook = model.fc2.bias.register_hook(lambda g: g * float("nan")) \
            if bad and kind != "sign" else None
        opt.zero_grad()                   # after a skipped batch too (issue 18, item 4)
        F.cross_entropy(model(xb), yb).backward()
        if hook is not None:
            hook.remove()
        before = flat(params + [opt.state[p].get("momentum_buffer", p) for p in params])
        try:
            if how == "synchronize":
                opt.synchronize()
                with opt.skip_synchronize():
                    opt.step()
            else:
                opt.step()
            steps_after += t > BAD
        except C.NonFiniteGradientError as e:
            errors.append(f"{t}: {e}")
            after = flat(params + [opt.state[p].get("momentum_buffer", p) for p in params])
            out[f"nan|{name}|unchanged"] = np.array(np.array_equal(before, after))
    return flat(params), errors, steps_after


for name, (kind, how, opts) in RUNS.items():
    got, errors, steps_after = train(name, kind, how, opts, skip_bad=False)
    want, none, _ = train(name, kind, how, opts, skip_bad=True)
    assert not none, none
    out[f"nan|{name}|params"] = got
    out[f"nan|{name}|oracle"] = want
    out[f"nan|{name}|errors"] = np.array(errors if errors else ["none"])
    out[f"nan|{name}|steps_after"] = np.array(steps_after)

out["rank"] = np.array(rank)
save_result(**out)
