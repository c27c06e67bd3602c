"""Overlap of the vote with backward: `mpirun -np 4 python benchmarks/overlap_bench.py`.

Times whole training iterations (forward, backward, optimizer step) of an MLP with
MVSM, with and without ``overlap=True``, in the same run, and checks that both end with
the same parameters.  Iterations of the two are interleaved; reports the median of the
per-iteration max over ranks."""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from common import Method, interleave, mlp, vote_vocabulary  # puts the checkout on sys.path
import signcomm
from signcomm.comm import get_transport


def run(args, transport):
    """Both optimizers on identical models and batches, iterations interleaved (sync,
    overlap, sync, ...) so that load swings on a shared machine hit both alike; returns
    {overlap: (median seconds, final parameters)}."""
    setups = {}
    for overlap in (False, True):
        model = mlp(args.width, args.depth, classes=10)
        opt = signcomm.MVSM(model.parameters(), lr=1e-3, beta=0.5, schedule=args.schedule,
                            transport=transport, bucket_elements=args.bucket, overlap=overlap)
        g = torch.Generator().manual_seed(transport.rank)
        batch = {}

        def draw(i, g=g, batch=batch):  # untimed: this iteration's batch
            batch["x"] = torch.randn(args.batch, args.width, generator=g)
            batch["y"] = torch.randint(0, 10, (args.batch,), generator=g)

        def iteration(i, model=model, opt=opt, batch=batch):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"]).backward()
            opt.step()
        setups[overlap] = (model, opt, Method(iteration, before=draw))
    interleave([m for _, _, m in setups.values()], args.iters, args.warmup,
               barrier=transport.barrier,
               allmax=lambda dt: float(transport.allreduce(np.array([dt]), "max")[0]))
    out = {}
    for overlap, (model, opt, method) in setups.items():
        opt.close()
        out[overlap] = (method.median, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bucket", type=int, default=1 << 20, help="coordinates per bucket")
    ap.add_argument("--schedule", default="allgather", choices=vote_vocabulary()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = get_transport("mpi")
    res = run(args, t)
    (sync_s, p_sync), (over_s, p_over) = res[False], res[True]
    same = bool(torch.equal(p_sync, p_over))
    if t.rank == 0:
        d = p_sync.numel()
        print(f"n={t.size} d={d:,} ({args.depth}x{args.width} MLP, batch {args.batch}, "
              f"buckets of {args.bucket:,}, schedule {args.schedule})")
        print(f"  iteration without overlap: {sync_s * 1e3:8.1f} ms")
        print(f"  iteration with overlap:    {over_s * 1e3:8.1f} ms   saving {1 - over_s / sync_s:+.1%}")
        print(f"  same parameters after both runs: {same}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dict(name="iteration", overlap=o, n=t.size, d=d, seconds=s,
                                baseline_seconds=sync_s, ratio=s / sync_s, same_result=same)
                           for o, s in ((False, sync_s), (True, over_s))], f, indent=1)
    if not same:
        raise SystemExit("overlap changed the result")


if __name__ == "__main__":
    main()
