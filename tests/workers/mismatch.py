"""Ranks configured differently: every setting that changes the result is in the step's
agreement, so each difference raises RankMismatchError on every rank, naming it.

Saves per rank ``err-<case>`` (the error text) and ``same-<case>`` (parameters unchanged)."""
import torch

from harness import save_result

import signcomm
from signcomm.comm import get_transport

T = get_transport("mpi")
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
for case, options in CASES.items():
    options = dict(dict(lr=0.1), **options)
    ws = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(3))]
    opt = signcomm.MVSM(ws, transport=T, **options)
    for w in ws:
        w.grad = torch.full_like(w, 0.5)
    try:
        opt.step()
        out[f"err-{case}"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out[f"err-{case}"] = f"{type(exc).__name__}: {exc}"
    out[f"same-{case}"] = all(bool(torch.equal(w.detach(), torch.ones_like(w))) for w in ws)
save_result(**out)
