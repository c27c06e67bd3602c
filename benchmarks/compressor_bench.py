"""Time per step and bytes per rank of signcomm's Horovod compressors against
``hvd.Compression.none`` and ``hvd.Compression.fp16``, on a ResNet-50-sized parameter set.

    python benchmarks/compressor_bench.py --np 2 4 8 [--json out.json]
    python benchmarks/compressor_bench.py --profile [--np 4] [--methods s1]

launches ``mpirun -np N`` of itself for each N (the compressors are compared in the same
job, so the ratios share one machine state) and prints one table per N.  ``--profile``
runs one process instead: n ranks simulated with ``size=/rank=`` compressors, each
repetition a whole step of all of them (compress, sum, decompress, through the public
calls only), rank 0's codec timed on the thread CPU clock next to a memory copy of the
same gradients, then one more step under cProfile, kernel by kernel.

The parameter set (``--shapes blocks``, the default): 16 tensors, 25,640,960 float32
parameters, shaped like ResNet-50's largest layers: the (1000, 2048) classifier, six
(512, 512, 3, 3) and nine (2048, 512, 1, 1) convolutions (ResNet-50 has 25.6M
parameters).  ``--shapes resnet50``: torchvision's resnet50() itself, 161 tensors and
25,557,032 parameters, most of them small biases and batch norms, so the codec's fixed
cost per tensor shows.  A step is what the
DistributedOptimizer does after backward: each rank's (fixed, random) gradients are
compressed, allreduced with Horovod's default op (Average), decompressed, and applied by
SGD: ``opt.synchronize()`` then ``opt.step()`` under ``skip_synchronize``.  No backward
pass is timed; it would cost every method the same.

Columns: ``ms/step`` (median over the timed steps of the slowest rank), ``codec ms``
(time inside compress + decompress per step, slowest rank), ``copy ms`` (each rank copies
its fp32 gradients into preallocated tensors, ``Tensor.copy_``, right before every step of
every method, untimed by the step clock: the memory floor, measured at the same moments
as the codec; slowest rank), ``codec/copy``, ``CPU: codec``, ``copy`` and their ``ratio``
(the same two on the calling thread's CPU clock, slowest rank: without the time a rank
waited for a core, which with more ranks than cores is most of the wall time),
``message MB`` (what one rank hands to the allreduce per step: 4 B per parameter
uncompressed), ``ring MB/rank`` (bytes one rank sends in a ring allreduce of that
message, 2 (n-1)/n x message, as
``signcomm.comm.ring_allreduce_bytes`` counts it; MPICH picks its
own algorithm, so this is the textbook figure, not a measurement), and the ratios of time
and bytes to ``none``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from common import (BLOCK_SHAPES, Method, Stopwatch, interleave, resnet50_shapes,
                    ring_allreduce_bytes, scaled_shapes, threads_per_rank)

SHAPE_SETS = {"blocks": lambda: BLOCK_SHAPES, "resnet50": resnet50_shapes}


def parameter_shapes(args):
    """The ``--shapes`` set, scaled by ``--scale``."""
    return scaled_shapes(SHAPE_SETS[args.shapes](), args.scale)


METHODS = ("none", "fp16", "sign", "sr", "s1")
WIRES = ("auto", "float64", "int64", "float64-radix", "int64-radix")


def rank_main(args):
    import numpy as np
    import torch
    import horovod.torch as hvd

    import compressors

    hvd.init()
    torch.set_num_threads(1)
    n, rank = hvd.size(), hvd.rank()
    shapes = parameter_shapes(args)
    gen = torch.Generator().manual_seed(1234 + rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    d = sum(p.numel() for p in params)
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]

    def make(method):
        if method == "none":
            return hvd.Compression.none
        if method == "fp16":
            return hvd.Compression.fp16
        return {"sign": compressors.SignCompressor, "sr": compressors.SRCompressor,
                "s1": compressors.S1Compressor}[method](seed=1, wire=args.wire)

    copies = [torch.empty_like(g) for g in grads]
    op = hvd.Sum if args.op == "sum" else hvd.Average
    rows = []
    for method in args.methods:
        comp = make(method)
        codec_clock = Stopwatch()
        timed = SimpleNamespace(compress=codec_clock.wrap(comp.compress),
                                decompress=codec_clock.wrap(comp.decompress))
        opt = hvd.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=1e-3),
                                       named_parameters=named, compression=timed, op=op)
        codec, codec_cpu, copy, copy_cpu = [], [], [], []

        def fresh_grads(i):  # untimed by the step clock, like the codec clock's reset
            t0, c0 = time.perf_counter(), time.thread_time()
            for c, g in zip(copies, grads):
                c.copy_(g)
            if i >= args.warmup:
                copy.append(time.perf_counter() - t0)
                copy_cpu.append(time.thread_time() - c0)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            codec_clock.reset()

        def step(i, opt=opt):
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()

        def keep_codec(i):
            if i >= args.warmup:
                codec.append(codec_clock.seconds)
                codec_cpu.append(codec_clock.cpu_seconds)

        (timing,) = interleave(
            [Method(step, before=fresh_grads, after=keep_codec)], args.steps, args.warmup,
            barrier=lambda: hvd.allreduce(torch.zeros(1), name=f"barrier.{method}"))
        times = timing.times
        if method in ("none", "fp16"):
            message = d * (4 if method == "none" else 2)
            wire = "fp32" if method == "none" else "fp16"
        else:
            message = comp.stats["wire_bytes"] // (args.warmup + args.steps)
            wire = comp.wire_used
        mine = torch.tensor([float(np.median(times)), float(np.median(codec)),
                             float(np.median(copy)), float(np.median(codec_cpu)),
                             float(np.median(copy_cpu))],
                            dtype=torch.float64)
        worst = hvd.allreduce(mine, name=f"worst.{method}", op=hvd.Max)
        rows.append(dict(method=method, n=n, params=d, ms_per_step=1e3 * worst[0].item(),
                         codec_ms=1e3 * worst[1].item(), copy_ms=1e3 * worst[2].item(),
                         codec_cpu_ms=1e3 * worst[3].item(), copy_cpu_ms=1e3 * worst[4].item(),
                         codec_vs_copy_cpu=worst[3].item() / worst[4].item(),
                         codec_vs_copy=worst[1].item() / worst[2].item(),
                         message_bytes=int(message), wire=wire, op=args.op,
                         ring_bytes_per_rank=ring_allreduce_bytes(message, n),
                         steps=args.steps, loadavg=os.getloadavg()[0],
                         cycle_time_ms=os.environ.get("HOROVOD_CYCLE_TIME", "1 (default)")))
        del opt
    if rank == 0:
        base = next((r for r in rows if r["method"] == "none"), None)
        for r in rows:
            if base:
                r["time_vs_none"] = r["ms_per_step"] / base["ms_per_step"]
                r["bytes_vs_none"] = r["message_bytes"] / base["message_bytes"]
            r["bits_per_param"] = 8 * r["message_bytes"] / d
        Path(args.out).write_text(json.dumps(rows))


def print_table(rows):
    n = rows[0]["n"]
    print(f"\nn = {n} ranks, {rows[0]['params']:,} parameters, op={rows[0]['op']}, median "
          f"of {rows[0]['steps']} steps (slowest rank), load {rows[0]['loadavg']:.1f}, "
          f"HOROVOD_CYCLE_TIME {rows[0].get('cycle_time_ms', '?')} ms")
    print(f"{'method':>6} {'wire':>13} {'ms/step':>9} {'codec ms':>9} {'copy ms':>8} "
          f"{'codec/copy':>10} {'CPU: codec':>10} {'copy':>5} {'ratio':>5} "
          f"{'message MB':>11} {'ring MB/rank':>13} {'bits/param':>10} "
          f"{'time/none':>10} {'bytes/none':>11}")
    for r in rows:
        ratio = r["codec_vs_copy"] if r["codec_ms"] else float("nan")
        print(f"{r['method']:>6} {r['wire']:>13} {r['ms_per_step']:9.1f} {r['codec_ms']:9.1f} "
              f"{r['copy_ms']:8.1f} {ratio:10.2f} {r['codec_cpu_ms']:10.1f} "
              f"{r['copy_cpu_ms']:5.1f} "
              f"{r['codec_vs_copy_cpu'] if r['codec_ms'] else float('nan'):5.2f} "
              f"{r['message_bytes'] / 1e6:11.2f} "
              f"{r['ring_bytes_per_rank'] / 1e6:13.2f} {r['bits_per_param']:10.2f} "
              f"{r.get('time_vs_none', float('nan')):10.2f} "
              f"{r.get('bytes_vs_none', float('nan')):11.3f}")


def profile_main(args):
    """One process: the codec of rank 0 of n simulated ranks, kernel by kernel."""
    import cProfile
    import pstats

    import numba
    import numpy as np
    import torch

    import compressors

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1234)
    shapes = parameter_shapes(args)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    d = sum(g.numel() for g in grads)
    copies = [torch.empty_like(g) for g in grads]
    kinds = {"sign": ("sign", "sign"), "sr": ("sr", "sign"), "s1": ("sr", "s1")}

    def cpu_ms(fn, reps=5):
        best = float("inf")
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        return 1e3 * best

    def copy():
        return [c.copy_(g) for c, g in zip(copies, grads)]

    copy_ms = cpu_ms(copy)
    print(f"{d:,} fp32 parameters in {len(shapes)} tensors; thread CPU time, best of 5; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"memory copy (Tensor.copy_ into preallocated tensors): {copy_ms:.1f} ms "
          f"({copy_ms * 1e6 / d:.2f} ns/param)")
    for n in args.np:
        for method in args.methods:
            if method not in kinds:
                continue
            contribute, vote = kinds[method]
            comps = [compressors.MajorityVoteCompressor(
                contribute=contribute, vote=vote, size=n, rank=j, seed=1, wire=args.wire)
                for j in range(n)]

            def step(prof=None):
                """One step of the n simulated ranks (rank j's gradients scaled by
                1 + j/2); returns rank 0's compress and decompress thread CPU ms, with
                ``prof`` (a cProfile) on around them."""
                spans = []

                def timed(fn):
                    if prof:
                        prof.enable()
                    t0 = time.thread_time()
                    out = fn()
                    spans.append(1e3 * (time.thread_time() - t0))
                    if prof:
                        prof.disable()
                    return out

                sent = [timed(lambda: [comps[0].compress(g) for g in grads])]
                sent += [[c.compress(g * (1 + 0.5 * j)) for g in grads]
                         for j, c in enumerate(comps[1:], 1)]
                total = [sum(s[i][0] for s in sent) for i in range(len(grads))]
                for j, c in enumerate(comps[1:], 1):
                    for t, (_, ctx) in zip(total, sent[j]):
                        c.decompress(t.clone(), ctx)
                timed(lambda: [comps[0].decompress(t, ctx)
                               for t, (_, ctx) in zip(total, sent[0])])
                return spans

            for _ in range(2):   # two steps: the second uses the common R
                step()
            # interleaved, best of 5 each: the copy beside the codec at the same moments
            # (this machine's speed drifts by tens of percent within a minute)
            best = [float("inf")] * 3
            for _ in range(5):
                here = [cpu_ms(copy, reps=1)] + step()
                best = [min(b, h) for b, h in zip(best, here)]
            here_ms, comp_ms, dec_ms = best
            print(f"\nn = {n}, {method} (wire {comps[0].wire_used}): compress {comp_ms:.1f} ms "
                  f"+ decompress {dec_ms:.1f} ms = {(comp_ms + dec_ms) / here_ms:.2f}x the "
                  f"copy ({here_ms:.1f} ms, interleaved)")
            prof = cProfile.Profile(time.thread_time)
            step(prof)
            st = pstats.Stats(prof)
            rows = sorted(((v[2], f) for f, v in st.stats.items()), reverse=True)[:10]
            for tt, (fname, line, func) in rows:
                where = f"{Path(fname).parent.name}/{Path(fname).name}:{func}"
                print(f"  {1e3 * tt:7.1f} ms  {tt * 1e9 / d:5.2f} ns/param  {where}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--np", type=int, nargs="+", default=[2, 4, 8],
                    help="numbers of ranks, one mpirun job each (default 2 4 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--wire", default="auto", choices=WIRES,
                    help="the compressors' wire (default auto: the cheapest exact one)")
    ap.add_argument("--op", default="average", choices=("average", "sum"),
                    help="the DistributedOptimizer's op (sum lets wire=auto use int64 words)")
    ap.add_argument("--shapes", default="blocks", choices=tuple(SHAPE_SETS),
                    help="the parameter set: 'blocks' (16 tensors, ResNet-50's largest "
                         "layers) or 'resnet50' (torchvision's 161 tensors, biases and "
                         "batch norms included: the per-tensor overhead shows)")
    ap.add_argument("--profile", action="store_true",
                    help="one process: the codec kernel by kernel against a memory copy")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale the parameter set (1.0 = 25.6M; smaller for a smoke run)")
    ap.add_argument("--cycle-time-ms", type=float,
                    help="HOROVOD_CYCLE_TIME for the jobs (default: Horovod's, 1 ms). Each "
                         "cycle's negotiation is a blocking MPI collective that MPICH "
                         "busy-waits in; with more ranks than cores it takes CPU from the "
                         "codec (docs/compressors.md)")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mpirun job")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        return rank_main(args)
    if args.profile:
        return profile_main(args)
    venv = Path(sys.executable).parent
    mpirun = str(venv / "mpirun") if (venv / "mpirun").exists() else "mpirun"
    all_rows = []
    for n in args.np:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("NUMBA_NUM_THREADS", str(threads_per_rank(n)))
            if args.cycle_time_ms is not None:
                env["HOROVOD_CYCLE_TIME"] = str(args.cycle_time_ms)
            env["PATH"] = str(venv) + os.pathsep + env.get("PATH", "")
            cmd = [mpirun, "-np", str(n), sys.executable, "-m", "mpi4py", __file__,
                   "--rank-main", "--out", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--scale", str(args.scale),
                   "--shapes", args.shapes, "--wire", args.wire, "--op", args.op,
                   "--methods", *args.methods]
            subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
            rows = json.loads(out.read_text())
        print_table(rows)
        all_rows += rows
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
