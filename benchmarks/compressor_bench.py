"""Time per step and bytes per rank of signcomm's Horovod compressors against
``hvd.Compression.none`` and ``hvd.Compression.fp16``, on a ResNet-50-sized parameter set.

    python benchmarks/compressor_bench.py --np 2 4 8 [--json out.json]

launches ``mpirun -np N`` of itself for each N (the compressors are compared in the same
job, so the ratios share one machine state) and prints one table per N.

The parameter set: 16 tensors, 25,640,960 float32 parameters, shaped like ResNet-50's
largest layers: the (1000, 2048) classifier, six (512, 512, 3, 3) and nine
(2048, 512, 1, 1) convolutions (ResNet-50 has 25.6M parameters).  A step is what the
DistributedOptimizer does after backward: each rank's (fixed, random) gradients are
compressed, allreduced with Horovod's default op (Average), decompressed, and applied by
SGD: ``opt.synchronize()`` then ``opt.step()`` under ``skip_synchronize``.  No backward
pass is timed; it would cost every method the same.

Columns: ``ms/step`` (median over the timed steps of the slowest rank), ``codec ms``
(time inside compress + decompress per step, slowest rank), ``message MB`` (what one rank
hands to the allreduce per step: 4 B per parameter uncompressed), ``ring MB/rank`` (bytes
one rank sends in a ring allreduce of that message, 2 (n-1)/n x message, as
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
from pathlib import Path
from types import SimpleNamespace

from common import Method, Stopwatch, hvd_sgd, interleave, ring_allreduce_bytes, threads_per_rank

SHAPES = [(1000, 2048)] + [(512, 512, 3, 3)] * 6 + [(2048, 512, 1, 1)] * 9
METHODS = ("none", "fp16", "sign", "sr", "s1")


def rank_main(args):
    import numpy as np
    import torch
    import horovod.torch as hvd

    import compressors

    hvd.init()
    torch.set_num_threads(1)
    n, rank = hvd.size(), hvd.rank()
    shapes = SHAPES if args.scale == 1.0 else [
        (max(1, int(s[0] * args.scale)),) + s[1:] for s in SHAPES]
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
                "s1": compressors.S1Compressor}[method](seed=1)

    rows = []
    for method in args.methods:
        comp = make(method)
        codec_clock = Stopwatch()
        timed = SimpleNamespace(compress=codec_clock.wrap(comp.compress),
                                decompress=codec_clock.wrap(comp.decompress))
        opt = hvd_sgd(hvd, named, lr=1e-3, compression=timed)
        codec = []

        def fresh_grads(i):  # untimed, like the codec clock's reset
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

        (timing,) = interleave(
            [Method(step, before=fresh_grads, after=keep_codec)], args.steps, args.warmup,
            barrier=lambda: hvd.allreduce(torch.zeros(1), name=f"barrier.{method}"))
        times = timing.times
        if method in ("none", "fp16"):
            message = d * (4 if method == "none" else 2)
        else:
            message = comp.stats["wire_bytes"] // (args.warmup + args.steps)
        mine = torch.tensor([float(np.median(times)), float(np.median(codec))],
                            dtype=torch.float64)
        worst = hvd.allreduce(mine, name=f"worst.{method}", op=hvd.Max)
        rows.append(dict(method=method, n=n, params=d, ms_per_step=1e3 * worst[0].item(),
                         codec_ms=1e3 * worst[1].item(), message_bytes=int(message),
                         ring_bytes_per_rank=ring_allreduce_bytes(message, n),
                         steps=args.steps))
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
    print(f"\nn = {n} ranks, {rows[0]['params']:,} parameters, median of "
          f"{rows[0]['steps']} steps (slowest rank)")
    print(f"{'method':>6} {'ms/step':>9} {'codec ms':>9} {'message MB':>11} "
          f"{'ring MB/rank':>13} {'bits/param':>10} {'time/none':>10} {'bytes/none':>11}")
    for r in rows:
        print(f"{r['method']:>6} {r['ms_per_step']:9.1f} {r['codec_ms']:9.1f} "
              f"{r['message_bytes'] / 1e6:11.2f} {r['ring_bytes_per_rank'] / 1e6:13.2f} "
              f"{r['bits_per_param']:10.2f} {r.get('time_vs_none', float('nan')):10.2f} "
              f"{r.get('bytes_vs_none', float('nan')):11.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--np", type=int, nargs="+", default=[2, 4, 8],
                    help="numbers of ranks, one mpirun job each (default 2 4 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale the parameter set (1.0 = 25.6M; smaller for a smoke run)")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mpirun job")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        return rank_main(args)
    venv = Path(sys.executable).parent
    mpirun = str(venv / "mpirun") if (venv / "mpirun").exists() else "mpirun"
    all_rows = []
    for n in args.np:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("NUMBA_NUM_THREADS", str(threads_per_rank(n)))
            env["PATH"] = str(venv) + os.pathsep + env.get("PATH", "")
            cmd = [mpirun, "-np", str(n), sys.executable, "-m", "mpi4py", __file__,
                   "--rank-main", "--out", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--scale", str(args.scale),
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
