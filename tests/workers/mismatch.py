"""Ranks configured differently: every setting that changes the result is in the step's
agreement, so each difference raises RankMismatchError on every rank, naming it.  Then
ranks whose steps have gradients for different parameters: "some" (odd ranks have no
gradient for the second parameter) and "none" (odd ranks have none at all), under the
shared R (the control carries per-tensor maxima) and a sign contribution (it carries
none): the control keeps one length on every rank, so each rank raises too.

Usage: mismatch.py [mpi|torch] (mpirun, or torchrun's environment with gloo).
Saves per rank ``err-<case>`` (the error text) and ``same-<case>`` (parameters
unchanged); the gradient cases are ``grads-<case>``."""
import sys

import torch

from harness import save_result

import signcomm
from signcomm.comm import get_transport

transport = sys.argv[1] if len(sys.argv) > 1 else "mpi"
if transport == "torch":
    import torch.distributed as dist
    dist.init_process_group("gloo")
T = get_transport(transport)
odd = T.rank % 2 == 1
CASES = {
    "lr": dict(lr=0.2 if odd else 0.1),
    "weight_decay": dict(weight_decay=0.01 if odd else 0.0),
    "beta": dict(beta=0.3 if odd else 0.5),
    "momentum_init": dict(momentum_init="zero" if odd else "first"),
    "bucket_elements": dict(bucket_elements=7 if odd else 8),
    "contribution": dict(contribution="sign" if odd else "sr"),
    "R": dict(R="local" if odd else "global"),
    "backend": dict(backend="torch" if odd else "numba"),
    "schedule": dict(schedule="sharded" if odd else "allgather"),
    "tie": dict(tie="zero" if odd else "coin"),
    "seed": dict(seed=1 if odd else 0),
}
out = {}


def record(case, opt, ws):
    """One step of ``opt``: its error (or "no error") and whether ``ws`` stayed ones."""
    try:
        opt.step()
        out[f"err-{case}"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out[f"err-{case}"] = f"{type(exc).__name__}: {exc}"
    out[f"same-{case}"] = all(bool(torch.equal(w.detach(), torch.ones_like(w))) for w in ws)


for case, options in CASES.items():
    options = dict(dict(lr=0.1), **options)
    ws = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(3))]
    opt = signcomm.MVSM(ws, transport=T, **options)
    for w in ws:
        w.grad = torch.full_like(w, 0.5)
    record(case, opt, ws)

for case, options in (("some-sr", {}), ("none-sr", {}), ("some-sign", dict(contribution="sign"))):
    ws = [torch.nn.Parameter(torch.ones(n)) for n in (10, 3, 5)]
    opt = signcomm.MVSM(ws, transport=T, lr=0.1, **options)
    for i, w in enumerate(ws):
        if not odd or (case.startswith("some") and i != 1):
            w.grad = torch.full_like(w, 0.5)
    record(f"grads-{case}", opt, ws)
save_result(**out)
