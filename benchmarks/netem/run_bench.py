#!/usr/bin/env python3
"""Run benchmarks/netem_bench.py in the emulated cluster for every n and bandwidth.

    sudo .venv/bin/python benchmarks/netem/run_bench.py     # full grid: 25-40 min on 2 shared cores
    sudo .venv/bin/python benchmarks/netem/run_bench.py --n 2 --gbit 1 --d 1e6   # quick look

One cluster of max(n) namespaces is built once; for each rate its links are re-shaped and,
for each n, two jobs run on the first n namespaces: the mpi4py / signcomm methods and the
Horovod methods.  Records go to ``<out>/netem.jsonl`` (raw, one per line, with the
job's load average and link byte counts) and ``<out>/netem.json`` (the same records with
``fp32_allreduce_seconds`` and ``horovod_fp32_allreduce_seconds`` of the same n, d and rate
filled in); then ``report.py`` writes the table and plots and ``cost_model.py`` fits the
model.  The cluster is torn down on every exit path (see cluster.py).
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
import cluster as netem  # noqa: E402
from common import threads_per_rank  # noqa: E402

ROOT = HERE.parent.parent
BENCH = ROOT / "benchmarks" / "netem_bench.py"
# method prefixes of netem_bench.py run at every rate, and those run only at --heavy-gbit
LIGHT = ["latency", "fp32_allreduce", "raw_", "vote_", "hvd_fp32", "hvd_fp16"]
HEAVY = ["mvsm_step", "sgd_step", "hvd_compressors", "hvd_sgd_step"]


def fill_baselines(records):
    """Attach the fp32 baselines of the same (n, d, rate) to every record."""
    base = {}
    for r in records:
        if r.get("seconds") is None:
            continue
        key = (r["n"], r["d"], r["gbit_per_s"])
        if r["method"] == "fp32_allreduce":
            base.setdefault(key, {})["fp32_allreduce_seconds"] = r["seconds"]
        elif r["method"] == "hvd_fp32_allreduce":
            base.setdefault(key, {})["horovod_fp32_allreduce_seconds"] = r["seconds"]
    for r in records:
        b = base.get((r["n"], r["d"], r["gbit_per_s"]), {})
        r["fp32_allreduce_seconds"] = b.get("fp32_allreduce_seconds")
        r["horovod_fp32_allreduce_seconds"] = b.get("horovod_fp32_allreduce_seconds")
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--gbit", type=float, nargs="+", default=[1, 10, 25])
    ap.add_argument("--d", type=float, nargs="+", default=[11.7e6, 25.6e6])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--method-budget", type=float, default=12.0,
                    help="seconds after which a method stops repeating (it keeps >= 2 reps)")
    ap.add_argument("--engines", nargs="+", default=["mpi", "horovod"])
    ap.add_argument("--methods", nargs="*", default=None,
                    help="method prefixes (default: LIGHT at every rate + HEAVY at --heavy-gbit)")
    ap.add_argument("--heavy-gbit", type=float, nargs="*", default=[1.0],
                    help="rates at which the HEAVY methods (full training steps, Horovod "
                         "compressors) also run (default 1: the targets' rate)")
    ap.add_argument("--job-timeout", type=float, default=400)
    ap.add_argument("--budget", type=float, default=1500, help="stop starting jobs after this, s")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--append", action="store_true", help="keep earlier records in netem.jsonl")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args(argv)

    why = netem.namespace_support()
    if why:
        print(f"run_bench.py: cannot build the emulated cluster here: {why}", file=sys.stderr)
        return 77
    netem._raise_on_signals()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "netem.jsonl"
    if not a.append and raw.exists():
        raw.unlink()
    t_start = time.monotonic()
    python = netem.venv_python()
    with netem.Cluster(max(a.n), a.gbit[0]) as c:
        print(f"run_bench.py: cluster {c.prefix} with {c.n} namespaces", flush=True)
        for gbit in a.gbit:
            c.set_rate(gbit)
            methods = a.methods if a.methods is not None else (
                LIGHT + (HEAVY if gbit in a.heavy_gbit else []))
            for n in sorted(a.n):
                for engine in a.engines:
                    if time.monotonic() - t_start > a.budget:
                        print(f"run_bench.py: budget of {a.budget:.0f}s spent; skipping the rest",
                              flush=True)
                        break
                    part = out / f".netem-{engine}-{n}-{gbit:g}.jsonl"
                    part.unlink(missing_ok=True)
                    threads = str(threads_per_rank(n))
                    cmd = ["env", f"NUMBA_NUM_THREADS={threads}", f"OMP_NUM_THREADS={threads}",
                           python, "-m", "mpi4py", str(BENCH), "--engine", engine,
                           "--gbit", str(gbit), "--reps", str(a.reps), "--warmup", str(a.warmup),
                           "--method-budget", str(a.method_budget),
                           "--d", *map(str, a.d), "--out", str(part), "--methods", *methods]
                    load = os.getloadavg()
                    before = c.link_bytes()
                    t0 = time.monotonic()
                    rc, text = c.run(cmd, n=n, timeout=a.job_timeout)
                    wall = time.monotonic() - t0
                    after = c.link_bytes()
                    print(text, end="", flush=True)
                    if rc != 0:
                        print(f"run_bench.py: job engine={engine} n={n} gbit={gbit} failed "
                              f"(rc={rc}); continuing", flush=True)
                    link = {r: [after[r]["tx"] - before[r]["tx"], after[r]["rx"] - before[r]["rx"]]
                            for r in range(n)}
                    if part.exists():
                        with open(part) as f, open(raw, "a") as g:
                            for line in f:
                                rec = json.loads(line)
                                rec.update(loadavg_before=load, job_wall_seconds=wall,
                                           job_link_bytes=link, job_rc=rc)
                                g.write(json.dumps(rec) + "\n")
                        part.unlink()
    records = [json.loads(line) for line in open(raw)] if raw.exists() else []
    fill_baselines(records)
    with open(out / "netem.json", "w") as f:
        json.dump(records, f, indent=1)
    print(f"run_bench.py: {len(records)} records -> {out / 'netem.json'} "
          f"({time.monotonic() - t_start:.0f}s)", flush=True)
    if not a.no_report:
        import report
        report.main(["--results", str(out)])
        import cost_model
        cost_model.main(["--results", str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
