"""Optimizer step time on a ResNet-50-sized parameter set: `mpirun -np 4 python benchmarks/optim_bench.py`.

Per rank and step, from ``opt.stats``: compress (momentum + R + S_R + packing), comm (time
inside collectives, including waiting for slower ranks), vote (the vote kernels) and
update (x <- x - lr o from the packed vote bits).  Next to them, in the same run and on the same
parameters: a memory copy of all parameters (one flat fp32 copy, and one copy per
tensor), the fp32 allreduce that plain data parallelism does instead (Horovod's
allreduce of every gradient, as ``hvd.DistributedOptimizer`` issues it, when Horovod
imports -- it runs in MPI mode under plain mpirun -- and a flat mpi4py Allreduce).
Figures are the median over steps of the max over ranks (the slowest rank sets the
pace).  Target (numba backend): compress + vote + update <= 4x the memory copy.
``--backend torch`` runs the pure-torch kernels; ``--device cuda`` puts the parameters on
the GPU (the copy is then device to device).

The parameter set is ResNet-50's (torchvision layout, 161 tensors, 25,557,032
coordinates: convolutions, batch-norm scales and shifts, the 2048 x 1000 classifier).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from common import (Method, fp32_allreduce_bytes, interleave, median_of_max, mpi_fp32_allreduce,
                    pin_threads, resnet50_shapes, scaled_shapes, vote_vocabulary)


def breakdown(opt, transport, reps, sync):
    """The step's pieces, timed one by one on every rank at once (median of the max over
    ranks): what MVSM.step does, called piece by piece through the engine's public
    methods on the optimizer's own buffers."""
    engine = opt.engine
    present = opt.entries()
    layout = engine.layout_for([p for _, p, _ in present])
    slices, first = [], 0
    for b in layout.buckets:
        slices.append(slice(first, first + len(b.params)))
        first += len(b.params)
    prepare = lambda: [opt.prepare_bucket(layout, bi, present[sl]) for bi, sl in enumerate(slices)]  # noqa: E731
    prepared = prepare()
    maxima = engine.start_control(layout, prepared, opt.signature(present), "the benchmark").wait()
    rs = engine.resolve_r(prepared, maxima)
    backend = engine.backend(layout.device)
    pack = lambda: [engine.contribution.pack(backend, p.v, 0, r=r, seg_sizes=b.sizes, offset=b.offset)[0]  # noqa: E731
                    for p, r, b in zip(prepared, rs, layout.buckets)]
    gathered = [transport.allgather(pk) for pk in pack()]
    key = engine.rule.shared_key(engine.contribution.seed, 0)
    vote = lambda: [backend.vote(g, b.d, engine.rule, key, b.offset)  # noqa: E731
                    for g, b in zip(gathered, layout.buckets)]
    votes = vote()
    lrs = [[g["lr"] for g, _, _ in present[sl]] for sl in slices]
    wds = [[g["weight_decay"] for g, _, _ in present[sl]] for sl in slices]
    pieces = {
        "momentum + finite + max|v| (fused)": prepare,
        f"S_R + pack ({backend.name})": pack,
        "vote kernel (n rows)": vote,
        "x -= lr * o from the vote bits": lambda: [engine.apply(layout, bi, votes[bi], lrs[bi], wds[bi])
                                                   for bi in range(len(slices))],
    }
    fig = {}
    for name, f in pieces.items():
        (m,) = interleave([Method(lambda i, f=f: (f(), sync()))], reps, barrier=transport.barrier)
        fig[name] = median_of_max(lambda a: transport.allreduce(a, "max"), m.times)
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mvsm-v1", help="a signcomm.create_optimizer name (default mvsm-v1)")
    ap.add_argument("--schedule", default="allgather",
                    help="a signcomm.vote.SCHEDULES name (default allgather)")
    ap.add_argument("--bucket", type=int, default=None, help="coordinates per fusion bucket (default: signcomm's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads per rank (default: cores / ranks on this host)")
    ap.add_argument("--no-horovod", action="store_true", help="skip Horovod's allreduce")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the parameter count (quick runs)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pieces of a step one by one (where the time goes)")
    ap.add_argument("--backend", default="auto", help="signcomm backend: auto, numba or torch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (rank r uses cuda:r %% devices)")
    ap.add_argument("--json", help="write the figures here (rank 0)")
    args = ap.parse_args()

    threads = pin_threads(threads=args.threads)  # before numba and torch load
    if args.schedule not in vote_vocabulary()[0]:
        ap.error(f"--schedule must be one of {vote_vocabulary()[0]}, got {args.schedule!r}")
    import torch
    torch.set_num_threads(threads)
    hvd = None
    if not args.no_horovod:
        try:
            import horovod.torch as hvd
            hvd.init()
        except Exception as exc:  # noqa: BLE001  (not built, or no MPI support)
            print(f"Horovod not available ({exc}); fp32 baseline through mpi4py only", file=sys.stderr)
            hvd = None
    import signcomm
    from signcomm.comm import get_transport

    transport = get_transport("mpi")  # the optimizer's transport; Horovod only as baseline
    rank, n = transport.rank, transport.size
    shapes = scaled_shapes(resnet50_shapes(), args.scale)
    gen = torch.Generator().manual_seed(1000 + rank)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.05).to(device)) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    d = sum(p.numel() for p in params)
    opts = {} if args.bucket is None else {"bucket_elements": args.bucket}
    opt = signcomm.create_optimizer(args.method, params, lr=1e-4, schedule=args.schedule,
                                    transport=transport, backend=args.backend, **opts)
    for p, g in zip(params, grads):
        p.grad = g

    keys = ("compress_s", "comm_s", "vote_s", "update_s")
    step_stats = {k: [] for k in keys}
    flat_src = torch.cat([p.detach().reshape(-1) for p in params])
    flat_dst = torch.empty_like(flat_src)
    copies = [torch.empty_like(p) for p in params]

    def keep_stats(i):
        if i >= args.warmup:
            for k in keys:
                step_stats[k].append(opt.stats[k])

    def hvd_allreduce_grads(i):  # as hvd.DistributedOptimizer issues it: one per gradient
        handles = [hvd.allreduce_async(g, name=f"g{j}", op=hvd.Average) for j, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    def copy_tensors(i):
        with torch.no_grad():
            torch._foreach_copy_(copies, [p.detach() for p in params])

    methods = {"step_s": Method(lambda i: (opt.step(), sync()), after=keep_stats),
               "memcpy_s": Method(lambda i: (flat_dst.copy_(flat_src), sync())),
               "memcpy_tensors_s": Method(lambda i: (copy_tensors(i), sync())),
               "mpi_fp32_s": Method(mpi_fp32_allreduce(transport.comm, flat_src.cpu().numpy()))}
    if hvd is not None:
        methods["hvd_fp32_s"] = Method(hvd_allreduce_grads)
    interleave(methods.values(), args.steps, args.warmup, barrier=transport.barrier)
    rows = dict(step_stats, **{k: m.times for k, m in methods.items()})
    if hvd is None:
        rows["hvd_fp32_s"] = [float("nan")] * args.steps
    fig = {k: median_of_max(lambda a: transport.allreduce(a, "max"), v) for k, v in rows.items()}
    parts = breakdown(opt, transport, args.steps, sync) if args.breakdown else None
    stats = opt.stats
    if rank == 0:
        work = fig["compress_s"] + fig["vote_s"] + fig["update_s"]
        ms = lambda s: f"{s * 1e3:9.1f} ms"  # noqa: E731
        print(f"{args.method} ({args.schedule}, backend {opt.engine.backend(device).name} on "
              f"{device.type}), n={n}, {len(params)} tensors, d={d:,}, "
              f"{threads} thread(s) per rank, {args.steps} steps (median of the max over ranks)")
        print(f"  momentum + S_R + pack  {ms(fig['compress_s'])}")
        print(f"  communication          {ms(fig['comm_s'])}   ({stats['bytes_sent']:,} B sent per rank per step)")
        print(f"  vote                   {ms(fig['vote_s'])}")
        print(f"  update                 {ms(fig['update_s'])}")
        print(f"  whole step             {ms(fig['step_s'])}")
        print(f"  memcpy of parameters   {ms(fig['memcpy_s'])}   (per tensor: {ms(fig['memcpy_tensors_s']).strip()})")
        print(f"  fp32 allreduce, mpi4py {ms(fig['mpi_fp32_s'])}   ({fp32_allreduce_bytes(d, n):,} B per rank, ring)")
        if hvd is not None:
            print(f"  fp32 allreduce, Horovod{ms(fig['hvd_fp32_s'])}")
        print(f"  compress+vote+update / memcpy = {work / fig['memcpy_s']:.2f}x  (target <= 4x: "
              f"{'met' if work <= 4 * fig['memcpy_s'] else 'MISSED'})")
        base = fig["hvd_fp32_s"] if hvd is not None else fig["mpi_fp32_s"]
        print(f"  whole step / fp32 allreduce ({'Horovod' if hvd is not None else 'mpi4py'}) = "
              f"{fig['step_s'] / base:.2f}x;  communication / fp32 allreduce = {fig['comm_s'] / base:.3f}x")
        if parts:
            print("  where the time goes (each piece alone, same data, all ranks at once):")
            for k, v in parts.items():
                print(f"    {k:34s}{ms(v)}   {v / fig['memcpy_s']:6.2f}x memcpy")
        if args.json:
            rec = dict(breakdown=parts, backend=opt.engine.backend(device).name, device=device.type,
                       method=args.method, schedule=args.schedule, n=n, d=d, tensors=len(params),
                       threads=threads, steps=args.steps, bytes_sent=stats["bytes_sent"],
                       bytes_received=stats["bytes_received"], horovod=hvd is not None,
                       work_over_memcpy=work / fig["memcpy_s"],
                       step_over_fp32_allreduce=fig["step_s"] / base, **fig)
            with open(args.json, "w") as f:
                json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
