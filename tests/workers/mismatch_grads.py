"""Ranks whose steps have gradients for different parameters: "some" (odd ranks have no
gradient for the second parameter) and "none" (odd ranks have no gradient at all), under
the shared R (the control carries per-tensor maxima) and a sign contribution (it carries
none).  The step's control allreduce keeps one length on every rank, so each rank raises
RankMismatchError and nothing moves.

Usage: mismatch_grads.py mpi|torch (mpirun, or torchrun's environment with gloo).
Saves per rank ``err-<case>`` (the error text) and ``same-<case>`` (parameters unchanged)."""
import sys

import torch

from harness import save_result

import signcomm
from signcomm.comm import get_transport

if sys.argv[1] == "torch":
    import torch.distributed as dist
    dist.init_process_group("gloo")
T = get_transport(sys.argv[1])
odd = T.rank % 2 == 1
out = {}
for case, options in (("some-sr", {}), ("none-sr", {}), ("some-sign", dict(contribution="sign"))):
    ws = [torch.nn.Parameter(torch.ones(n)) for n in (10, 3, 5)]
    opt = signcomm.MVSM(ws, transport=T, lr=0.1, **options)
    for i, w in enumerate(ws):
        if not odd or (case.startswith("some") and i != 1):
            w.grad = torch.full_like(w, 0.5)
    try:
        opt.step()
        out[f"err-{case}"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out[f"err-{case}"] = f"{type(exc).__name__}: {exc}"
    out[f"same-{case}"] = all(bool(torch.equal(w.detach(), torch.ones_like(w))) for w in ws)
save_result(**out)
