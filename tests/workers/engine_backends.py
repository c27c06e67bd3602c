"""The engine on real ranks: backend parity, non-blocking handles, mismatch errors.

argv: transport ("mpi" | "horovod").  Saves per rank:
- ``traj-<case>-<backend>``: flat parameters after each step of a short run of the
  optimizer problem (tests/optim_oracle.py) with that backend; cases cover every preset,
  schedule, R policy, tie rule, weight decay and fp16/bf16 parameters;
- ``nb-*``: results of non-blocking collectives started on several channels;
- ``mm-err``: the error of a step where rank 0 uses another backend than the others.
"""
import sys

import numpy as np
import torch

torch.set_num_threads(1)

from harness import save_result  # noqa: E402

transport_name = sys.argv[1]
if transport_name == "horovod":
    import horovod.torch as hvd
    hvd.init()

import signcomm  # noqa: E402
from optim_oracle import SPECS, batch, init_params, loss_fn  # noqa: E402
from signcomm.comm import get_transport  # noqa: E402

STEPS, LR = 8, 0.05
T = get_transport(transport_name)
rank, n = T.rank, T.size
out = {}

CASES = [(m, dict(schedule=s)) for m in ("signsgd-mv", "signum-mv", "sto-signsgd",
                                         "mv-sto-signsgd-sim", "mvsm-v1", "mvsm-v2")
         for s in ("allgather", "sharded", "allreduce")]
CASES += [("mvsm-v1", dict(R="local")), ("mvsm-v1", dict(R=0.05, schedule="sharded")),
          ("mvsm-v1", dict(tie="zero", schedule="sharded")), ("mvsm-v1", dict(tie="zero")),
          ("mvsm-v2", dict(weight_decay=0.1, schedule="allreduce"))]


def run(method, options, backend, dtypes=None):
    params = {k: torch.nn.Parameter(v) for k, v in init_params(3, dtypes).items()}
    order = [params[name] for name, _ in SPECS]
    opt = signcomm.create_optimizer(method, order, lr=LR, transport=T, seed=11,
                                    bucket_elements=40, backend=backend, **options)
    traj = []
    for step in range(STEPS):
        for p in order:
            p.grad = None
        x, y = batch(rank, step, True)
        loss_fn({k: p for k, p in params.items() if k != "unused"}, x, y).backward()
        opt.step()
        traj.append(torch.cat([p.detach().float().reshape(-1) for p in order]).numpy().copy())
    return np.stack(traj)


for i, (method, options) in enumerate(CASES):
    for backend in ("numba", "torch"):
        out[f"traj-{i}-{backend}"] = run(method, options, backend)
for backend in ("numba", "torch"):
    out[f"traj-dt-{backend}"] = run("mvsm-v1", dict(weight_decay=0.05), backend,
                                    {"w1": "fp16", "w2": "bf16"})

# non-blocking collectives on three channels, started before any is waited for
a = np.full(5, rank, np.uint8)
h1 = T.start_allgather(a, channel=1, name="t.ag")
h2 = T.start_allreduce(np.arange(4, dtype=np.int64) * (rank + 1), "sum", channel=2, name="t.ar")
h0 = T.start_alltoall(np.repeat(np.arange(n, dtype=np.uint8)[:, None] + 10 * rank, 3, 1),
                      channel=0, name="t.a2a")
tt = T.start_allgather(torch.full((3,), rank, dtype=torch.uint8), channel=1, name="t.agt")
out["nb-allreduce"] = h2.wait()
out["nb-alltoall"] = h0.wait()
out["nb-allgather"] = h1.wait()
gathered_t = tt.wait()
out["nb-torch-type"] = type(gathered_t).__name__
out["nb-torch"] = gathered_t.numpy()
out["nb-ledger-calls"] = len(T.ledger.records)

# ranks with different backends: caught by the agreement on every rank, nothing moves
if n > 1:
    w = torch.nn.Parameter(torch.ones(10))
    opt = signcomm.MVSM([w], lr=0.1, transport=T, backend="numba" if rank == 0 else "torch")
    w.grad = torch.full((10,), 0.5)
    try:
        opt.step()
        out["mm-err"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["mm-err"] = f"{type(exc).__name__}: {exc}"
    out["mm-unchanged"] = bool(torch.equal(w.detach(), torch.ones(10)))
save_result(**out)
