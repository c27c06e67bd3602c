"""Sync and overlapped MVSM runs on the same data: parameters and ledgers per rank."""
import sys

import torch

from harness import save_result

transport = sys.argv[1]
if transport == "horovod":
    import horovod.torch as hvd
    hvd.init()
import signcomm  # noqa: E402


def run(variant, overlap, steps=6):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = signcomm.MVSM(m.parameters(), lr=0.01, beta=0.5, variant=variant, transport=transport,
                        bucket_elements=2000, overlap=overlap)
    rank = opt.transport.rank
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(32, 30, generator=g)
        y = torch.randint(0, 5, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    # a NaN during an overlapped step: error on every rank, nothing updated
    before = torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])
    opt.zero_grad()
    loss = m(torch.randn(4, 30)).sum()
    loss.backward()
    if rank == 0:
        m[2].weight.grad[0, 0] = float("nan")
    try:
        opt.step()
        err = "no error"
    except Exception as exc:  # noqa: BLE001
        err = f"{type(exc).__name__}: {exc}"
    after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    return before.numpy(), torch.equal(before, after), err, len(opt._layout(opt._present())) if not overlap else len(opt._overlap.buckets)


out = {}
for variant in ("v1", "v2"):
    for overlap in (False, True):
        p, unchanged, err, nb = run(variant, overlap)
        key = f"{variant}-{int(overlap)}"
        out[key + "-params"], out[key + "-unchanged"], out[key + "-err"], out[key + "-buckets"] = p, unchanged, err, nb
save_result(**out)
