#!/usr/bin/env python3
"""Horovod steps with signcomm's compressors against ``Compression.none`` on the emulated
bandwidth-limited cluster (docs/netem.md), all methods of one n in one job.

    sudo .venv/bin/python benchmarks/netem/compressor_step.py              # n = 4, 8; 1 Gbit/s
    sudo .venv/bin/python benchmarks/netem/compressor_step.py --n 4 --reps 2 --scale 0.1

One cluster of max(n) namespaces; for each n one MPI job (Horovod in MPI mode over the
shaped links) runs, in turns (repetition i runs every method once, the first method
rotating), for each method in ``--methods`` (none, fp16, sign, sr, s1, and ``floor``):

- ``opt``: a DistributedOptimizer step over the 16 ResNet-50-shaped tensors of
  benchmarks/compressor_bench.py (25,640,960 fp32 parameters): every gradient is
  compressed, allreduced (op=Average) and decompressed, then SGD steps
  (``opt.synchronize()`` + ``opt.step()``; the gradients are fixed, so no forward or
  backward pass is timed: they would cost every method the same);
- ``fn``: ``hvd.allreduce(x, compression=...)`` of one flat 25.6M tensor (the
  measurement of the issue's netem figures).

``floor`` is a diagnostic, not a compressor: it hands Horovod a cached wire tensor of
exactly s1's message size (zeros) and returns a cached +-1 gradient, with no codec work at
all. Its step is what any compressor with that message would take on this machine with
a free codec: the bound below which no codec work can bring ``sign`` or ``s1``.

Each record: median over the timed repetitions of the slowest rank's seconds, the codec
seconds (wall time inside compress + decompress on rank 0), the bytes one rank handed to
the allreduce, the bytes that crossed each rank's link during the job (tc counters), the
CPU seconds of a step summed over the ranks (each rank's median; its whole process, its
main thread alone, and that thread's CPU inside compress + decompress), and the load
average.  Records go to ``--out`` (JSON); a table is printed, where ``CPU ms/core`` is
that CPU divided by the machine's cores (close to ``ms``: the step kept every core busy),
``main %`` the main threads' share of it (the rest: Horovod's background thread and MPI's
progress, polling included) and ``codec %`` the codec's share.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks/

ROOT = HERE.parent.parent
METHODS = ("none", "fp16", "sign", "sr", "s1", "floor")


def rank_main(a):
    import numpy as np
    import torch
    import horovod.torch as hvd

    import compressors
    from common import (BLOCK_SHAPES, Method, Stopwatch, interleave, scaled_shapes,
                        threads_per_rank)

    hvd.init()
    torch.set_num_threads(threads_per_rank(hvd.size()))
    n, rank = hvd.size(), hvd.rank()
    shapes = scaled_shapes(BLOCK_SHAPES, a.scale)
    gen = torch.Generator().manual_seed(1234 + rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    d = sum(p.numel() for p in params)
    flat = torch.randn(d, generator=gen)

    class Floor:
        """No codec work: s1's message size, cached tensors (see the module doc).  Tensors
        of one size share one wire tensor: it is all zeros, so Horovod's in-place sums
        leave it so.  ``stats`` and ``wire_used`` as the compressors have them."""

        def __init__(self):
            self.wire, self.out = {}, {}
            self.stats = {"wire_bytes": 0}
            self.wire_used = "float64 (none)"

        def compress(self, tensor):
            m = compressors.message_words(tensor.numel(), n, "float64-radix")
            if m not in self.wire:
                self.wire[m] = torch.zeros(m, dtype=torch.float64)
            key = tuple(tensor.shape)
            if key not in self.out:
                self.out[key] = torch.ones(key, dtype=tensor.dtype)
            self.stats["wire_bytes"] += self.wire[m].nbytes
            return self.wire[m], key

        def decompress(self, tensor, ctx):
            return self.out[ctx]

    def make(method):
        if method == "floor":
            return Floor()
        if method == "none":
            return hvd.Compression.none
        if method == "fp16":
            return hvd.Compression.fp16
        return {"sign": compressors.SignCompressor, "sr": compressors.SRCompressor,
                "s1": compressors.S1Compressor}[method](seed=1)

    def allmax(x):
        return float(hvd.allreduce(torch.tensor([x], dtype=torch.float64), op=hvd.Max,
                                   name="bench.max").item())

    runs = []
    for method in a.methods:
        for what in a.what:
            comp = make(method)
            clock = Stopwatch()
            timed = comp if method in ("none", "fp16", "floor") else type("Timed", (), dict(
                compress=staticmethod(clock.wrap(comp.compress)),
                decompress=staticmethod(clock.wrap(comp.decompress))))
            run = dict(method=method, what=what, comp=comp, clock=clock, codec=[],
                       codec_cpu=[], cpu=[])
            if what == "opt":
                opt = hvd.DistributedOptimizer(
                    torch.optim.SGD(params, lr=1e-4), named_parameters=named,
                    compression=timed)

                def before(i, clock=clock):
                    for p, g in zip(params, grads):
                        p.grad = g.clone()
                    clock.reset()

                def step(i, opt=opt):
                    opt.synchronize()
                    with opt.skip_synchronize():
                        opt.step()
            else:
                def before(i, clock=clock):
                    clock.reset()

                def step(i, timed=timed, method=method):
                    hvd.allreduce(flat, name=f"fn.{method}", compression=timed)

            def after(i, run=run):
                if i >= a.warmup:
                    run["codec"].append(run["clock"].seconds)
                    run["codec_cpu"].append(run["clock"].cpu_seconds)

            def cpu_clocked(i, step=step, run=run):
                """The step, and this process's CPU seconds in it: all its threads
                (Horovod's background thread, MPI's progress) and the main one."""
                p0, t0 = time.process_time(), time.thread_time()
                step(i)
                if i >= a.warmup:
                    run["cpu"].append((time.process_time() - p0, time.thread_time() - t0))

            run["m"] = Method(cpu_clocked, before=before, after=after, name=f"{what}.{method}")
            runs.append(run)
    t0 = time.time()
    interleave([r["m"] for r in runs], a.reps, a.warmup, barrier=hvd.barrier,
               allmax=allmax, rotate=True)
    wall = time.time() - t0
    for r in runs:   # median CPU seconds per step, summed over the ranks
        med = np.median(np.asarray(r["cpu"], np.float64), axis=0)
        med = np.append(med, np.median(r["codec_cpu"]) if r["codec_cpu"] else 0.0)
        r["cpu_sum"] = hvd.allreduce(torch.tensor(med), op=hvd.Sum,
                                     name=f"bench.cpu.{r['m'].name}").tolist()
    if rank == 0:
        with open(a.out, "w") as f:
            for r in runs:
                comp, method = r["comp"], r["method"]
                steps = a.warmup + a.reps
                if method in ("none", "fp16"):
                    msg = d * (4 if method == "none" else 2)
                    wire = "fp32" if method == "none" else "fp16"
                else:
                    msg = comp.stats["wire_bytes"] // steps
                    wire = comp.wire_used
                f.write(json.dumps(dict(
                    method=method, what=r["what"], n=n, d=d, gbit=a.gbit,
                    seconds=float(np.median(r["m"].times)), times=r["m"].times,
                    codec_seconds=float(np.median(r["codec"])) if r["codec"] else 0.0,
                    cpu_seconds_all_ranks=r["cpu_sum"][0],
                    main_thread_cpu_seconds_all_ranks=r["cpu_sum"][1],
                    codec_cpu_seconds_all_ranks=r["cpu_sum"][2], cores=os.cpu_count(),
                    message_bytes=int(msg), wire=wire, reps=a.reps, job_seconds=wall,
                    loadavg=os.getloadavg())) + "\n")
    hvd.shutdown()


def print_table(rows):
    base = {(r["n"], r["what"]): r["seconds"] for r in rows if r["method"] == "none"}
    print(f"\n{'n':>2} {'step':>4} {'method':>6} {'wire':>13} {'ms':>8} {'codec ms':>9} "
          f"{'message MB':>10} {'link MB/rank':>12} {'none/this':>9} {'CPU ms/core':>11} "
          f"{'main %':>6} {'codec %':>7}")
    for r in rows:
        b = base.get((r["n"], r["what"]))
        cpu = r.get("cpu_seconds_all_ranks", float("nan"))   # (older records lack them)
        main = r.get("main_thread_cpu_seconds_all_ranks", float("nan"))
        codec = r.get("codec_cpu_seconds_all_ranks", float("nan"))
        print(f"{r['n']:>2} {r['what']:>4} {r['method']:>6} {r['wire']:>13} "
              f"{1e3 * r['seconds']:8.0f} {1e3 * r['codec_seconds']:9.0f} "
              f"{r['message_bytes'] / 1e6:10.2f} {r.get('link_mb_per_rank', float('nan')):12.1f} "
              f"{(b / r['seconds']) if b else float('nan'):9.2f} "
              f"{1e3 * cpu / r.get('cores', 1):11.0f} {100 * main / max(cpu, 1e-9):6.0f} "
              f"{100 * codec / max(cpu, 1e-9):7.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--gbit", type=float, default=1.0)
    ap.add_argument("--methods", nargs="+", default=["none", "sign", "s1"], choices=METHODS)
    ap.add_argument("--what", nargs="+", default=["opt", "fn"], choices=("opt", "fn"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale the parameter set (1.0 = 25.6M; smaller for a smoke run)")
    ap.add_argument("--job-timeout", type=float, default=1500)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "netem_compressors.json"))
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank_main:
        return rank_main(a)

    import cluster as netem
    from common import threads_per_rank

    why = netem.namespace_support()
    if why:
        print(f"compressor_step.py: cannot build the emulated cluster here: {why}",
              file=sys.stderr)
        return 77
    netem._raise_on_signals()
    python = netem.venv_python()
    rows = []
    with netem.Cluster(max(a.n), a.gbit) as c:
        print(f"compressor_step.py: cluster {c.prefix}, {c.n} namespaces, {a.gbit:g} Gbit/s",
              flush=True)
        for n in sorted(a.n):
            part = Path(c.hostfile).parent / f"rows-{n}.jsonl"
            threads = str(threads_per_rank(n))
            cmd = ["env", f"NUMBA_NUM_THREADS={threads}", f"OMP_NUM_THREADS={threads}",
                   python, "-m", "mpi4py", str(Path(__file__).resolve()), "--rank-main",
                   "--out", str(part), "--reps", str(a.reps), "--warmup", str(a.warmup),
                   "--scale", str(a.scale), "--gbit", str(a.gbit),
                   "--methods", *a.methods, "--what", *a.what]
            before = c.link_bytes()
            load = os.getloadavg()
            rc, text = c.run(cmd, n=n, timeout=a.job_timeout)
            after = c.link_bytes()
            print(text[-3000:], end="", flush=True)
            if rc != 0 or not part.exists():
                print(f"compressor_step.py: n={n} failed (rc={rc})", flush=True)
                continue
            link = [(after[r]["tx"] - before[r]["tx"]) for r in range(n)]
            for line in part.read_text().splitlines():
                rec = json.loads(line)
                rec.update(loadavg_before=load, job_link_tx_bytes=link)
                rows.append(rec)
    # link bytes are per job; attribute them to the methods by their message bytes
    for n in sorted({r["n"] for r in rows}):
        mine = [r for r in rows if r["n"] == n]
        total = sum(r["message_bytes"] * (r["reps"] + 1) for r in mine)
        tx = max(mine[0]["job_link_tx_bytes"])
        for r in mine:
            r["link_mb_per_rank"] = tx * r["message_bytes"] / total / 1e6 if total else 0.0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
