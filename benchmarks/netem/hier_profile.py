#!/usr/bin/env python3
"""Where the hierarchical step's time goes (docs/netem.md, "Machines of several ranks"):
per phase, every rank's wall time and its own CPU time, for the flat and the
hierarchical MVSM step (v1, sharded) on the same parameters as hier_bench.py, in turns.

Run it on the emulated cluster (as root):

    .venv/bin/python benchmarks/netem/cluster.py --np 8 --ranks-per-machine 2 --gbit 1 -- \\
        .venv/bin/python benchmarks/netem/hier_profile.py [--reps 4] [--out FILE]

``SIGNCOMM_MPI_SHARED_WINDOW=0`` in the environment makes the machine's exchanges go as
messages (the alltoall and allgather) instead of through the shared-memory window.
Phases are the engine's public steps, timed by wrapping them (``stage``, ``reduce``:
the machine mean, ``machine_mean``: its sum alone, ``prepare``: the momentum, the
control's wait, ``start``: S_R, packing and posting, ``VoteHandle.finish``: the vote's
rounds and, hierarchical, the allgather inside the machine, ``apply``); the ledger's
seconds per kind and operation beside them.  CPU time is the rank's own thread's
(``time.thread_time``): with 8 ranks on a few cores, wall minus CPU is time waiting or
not scheduled.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks/

from common import Stopwatch, pin_threads  # noqa: E402

PHASES = {}   # label -> Stopwatch


def timed(obj, name, label):
    """Wrap ``obj.name`` in the Stopwatch of ``label`` (wall and thread CPU seconds)."""
    PHASES[label] = watch = Stopwatch()
    setattr(obj, name, watch.wrap(getattr(obj, name)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="as hier_bench.py --scale")
    ap.add_argument("--out", default=None, help="JSON of every rank's records")
    a = ap.parse_args(argv)
    threads = pin_threads(int(os.environ.get("PMI_SIZE", "1")))
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    from mpi4py import MPI

    import signcomm
    from hier_bench import make_params
    from signcomm import engine, hierarchy, vote
    from signcomm.comm import base

    for name, label in (("stage", "stage"), ("reduce", "reduce (machine mean)"),
                        ("prepare", "prepare (momentum)"), ("start", "start (S_R, post)"),
                        ("apply", "apply")):
        timed(engine.VoteEngine, name, label)
    timed(hierarchy, "machine_mean", "  of which the sum")
    timed(base.Agreement, "wait", "control wait")
    timed(vote.VoteHandle, "finish", "finish (rounds)")
    comm = MPI.COMM_WORLD
    params, grads = make_params(a.scale, comm.rank)
    opts = {m: signcomm.MVSM(params, lr=1e-4, variant="v1", schedule="sharded",
                             transport="mpi", **kw)
            for m, kw in (("flat", {}), ("hier", {"hierarchy": "host"}))}
    records = {m: [] for m in opts}
    for i in range(a.reps + 1):     # the first round is a warm-up
        for m in (list(opts) if i % 2 == 0 else list(opts)[::-1]):
            for p, g in zip(params, grads):
                p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
            comm.Barrier()
            for watch in PHASES.values():
                watch.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            opts[m].step()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            ledger = {}
            for rec in opts[m].transport.ledger.records:
                key = f"{rec.kind}:{rec.op}"
                ledger[key] = ledger.get(key, 0.0) + rec.seconds
            if i:
                records[m].append(dict(wall=wall, cpu=cpu, ledger=ledger,
                                       phases={k: [w.seconds, w.cpu_seconds]
                                               for k, w in PHASES.items() if w.seconds}))
    every = comm.gather(records, root=0)
    if comm.rank:
        return 0
    if a.out:
        Path(a.out).write_text(json.dumps(every))
    window = os.environ.get("SIGNCOMM_MPI_SHARED_WINDOW", "1")
    print(f"hier_profile.py: {comm.size} ranks, d = {sum(p.numel() for p in params)}, "
          f"SIGNCOMM_MPI_SHARED_WINDOW={window}; per phase: mean over ranks of each rank's "
          "median (max over ranks)")
    for m in opts:
        walls = [max(r[m][i]["wall"] for r in every) for i in range(a.reps)]
        cpus = [sum(r[m][i]["cpu"] for r in every) for i in range(a.reps)]
        print(f"{m}: step {statistics.median(walls):.3f} s (slowest rank; "
              f"{', '.join(f'{w:.2f}' for w in walls)}), CPU of all ranks "
              f"{statistics.median(cpus):.2f} s")

        def row(label, values):
            print(f"  {label:32s} {np.mean(values):7.3f} s ({max(values):.3f})", end="")

        for key in sorted({k for r in every for s in r[m] for k in s["phases"]}):
            row(key + " wall", [statistics.median(s["phases"].get(key, [0, 0])[0] for s in r[m])
                                for r in every])
            cpu = [statistics.median(s["phases"].get(key, [0, 0])[1] for s in r[m])
                   for r in every]
            print(f"   cpu {np.mean(cpu):.3f} s")
        for key in sorted({k for r in every for s in r[m] for k in s["ledger"]}):
            row("ledger " + key, [statistics.median(s["ledger"].get(key, 0.0) for s in r[m])
                                  for r in every])
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
