"""Sync and overlapped MVSM runs on the same data: parameters and ledgers per rank."""
import sys

import torch

from harness import save_result

transport = sys.argv[1]
if transport == "horovod":
    import horovod.torch as hvd
    hvd.init()
elif transport == "torch":   # under torchrun, as a user's script starts
    torch.distributed.init_process_group("gloo")
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
    if rank == 0:  # the NaN appears during backward, where the overlap reads gradients
        def poison(grad):
            grad = grad.clone()
            grad[0, 0] = float("nan")
            return grad
        hook = m[2].weight.register_hook(poison)
    loss = m(torch.randn(4, 30)).sum()
    loss.backward()
    if rank == 0:
        hook.remove()
    try:
        opt.step()
        err = "no error"
    except Exception as exc:  # noqa: BLE001
        err = f"{type(exc).__name__}: {exc}"
    after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    return before.numpy(), torch.equal(before, after), err, len(opt.engine.layout.buckets)


def hooks_after_drop():
    """Dropping an overlapped optimizer removes its hooks: the model trains on with a
    new optimizer, and no stale hook starts collectives of its own."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    x, y = torch.randn(8, 30), torch.randint(0, 5, (8,))
    counts = []
    for close in (False, True):
        opt = signcomm.MVSM(m.parameters(), lr=0.01, transport=transport, bucket_elements=500,
                            overlap=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        counts.append(sum(len(p._post_accumulate_grad_hooks or {}) for p in m.parameters()))
        if close:
            opt.close()
        del opt  # no gc.collect(): reference counting alone must release the hooks
        counts.append(sum(len(p._post_accumulate_grad_hooks or {}) for p in m.parameters()))
    opt = signcomm.MVSM(m.parameters(), lr=0.01, transport=transport)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return counts, torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy()


def gradient_sets(mode, overlap):
    """Steps in which some parameters get no gradient: on odd ranks only ("odd": a
    RankMismatchError on every rank, nothing updated, and the following steps work), or
    on every rank ("all": the synchronous fallback, equal to overlap=False)."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    params = [*a.parameters(), *b.parameters()]
    opt = signcomm.MVSM(params, lr=0.1, transport=transport, bucket_elements=64, overlap=overlap)
    rank = opt.transport.rank
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    errs = []
    for it in range(4):
        opt.zero_grad()
        h = a(x)
        skip = it == 1 and (mode == "all" or rank % 2 == 1)
        (h.sum() if skip else b(h).sum()).backward()
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        try:
            opt.step()
            errs.append("no error")
        except Exception as exc:  # noqa: BLE001
            after = torch.cat([p.detach().reshape(-1) for p in params])
            errs.append(f"{type(exc).__name__}: {exc} (unchanged={torch.equal(before, after)})")
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy(), errs


out = {}
out["hook-counts"], out["after-drop-params"] = hooks_after_drop()
for mode, overlap in (("odd", True), ("all", True), ("all", False)):
    out[f"sets-{mode}-{int(overlap)}-params"], errs = gradient_sets(mode, overlap)
    out[f"sets-{mode}-{int(overlap)}-errs"] = "\n".join(errs)
for variant in ("v1", "v2"):
    for overlap in (False, True):
        p, unchanged, err, nb = run(variant, overlap)
        key = f"{variant}-{int(overlap)}"
        out[key + "-params"], out[key + "-unchanged"], out[key + "-err"], out[key + "-buckets"] = p, unchanged, err, nb
save_result(**out)
