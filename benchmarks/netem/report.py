#!/usr/bin/env python3
"""Table and plots from benchmarks/results/netem.json (written by run_bench.py).

    .venv/bin/python benchmarks/netem/report.py [--results benchmarks/results]

Writes ``netem_table.md`` (time per step, its ratio to the wire-time floor and the speed-up
over fp32 allreduce, per rate, n and d) and ``netem_<gbit>gbit.png`` (time per step vs n,
with the floors dashed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# (method, label) in table order
METHODS = [
    ("fp32_allreduce", "fp32 allreduce (mpi4py)"),
    ("hvd_fp32_allreduce", "fp32 allreduce (Horovod)"),
    ("hvd_fp16_allreduce", "fp16 compression (Horovod)"),
    ("raw_allgather", "raw: allgather d/8 B"),
    ("raw_sharded", "raw: alltoall + allgather d/8n B"),
    ("raw_count_allreduce", "raw: count-field allreduce"),
    ("vote_allgather_v1", "vote allgather v1"),
    ("vote_allgather_v2", "vote allgather v2"),
    ("vote_sharded_v1", "vote sharded v1"),
    ("vote_sharded_v2", "vote sharded v2"),
    ("vote_allreduce_v1", "vote packed-count v1"),
    ("vote_allreduce_v2", "vote packed-count v2"),
    ("signvote_sharded_v2", "S_R+vote+apply, sharded v2"),
    ("signvote_allgather_v2", "S_R+vote+apply, allgather v2"),
    ("signvote_allreduce_v2", "S_R+vote+apply, packed-count v2"),
    ("hvd_sign", "Horovod + compressors.Compression.sign"),
    ("hvd_s1", "Horovod + compressors.Compression.s1"),
    ("sgd_step", "STEP: SGD, fp32 mpi4py allreduce"),
    ("hvd_sgd_step", "STEP: SGD, Horovod DistributedOptimizer fp32"),
    ("mvsm_step", "STEP: MVSM sharded v2"),
    ("mvsm_step_overlap", "STEP: MVSM sharded v2, overlap"),
]
STEPS = {"sgd_step", "hvd_sgd_step", "mvsm_step", "mvsm_step_overlap"}


def load(results):
    with open(Path(results) / "netem.json") as f:
        return json.load(f)


def fmt_ms(s):
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def table(records):
    ok = [r for r in records if r.get("seconds") is not None]
    rates = sorted({r["gbit_per_s"] for r in ok})
    cols = sorted({(r["n"], r["d"]) for r in ok if r["d"] > 0})
    idx = {(r["method"], r["n"], r["d"], r["gbit_per_s"]): r for r in ok}
    lines = []
    for g in rates:
        lines.append(f"\n#### {g:g} Gbit/s per link\n")
        lines.append("Cell: time per step in ms (comm = time inside the collectives, when the "
                     "step also computes) / wire-time floor in ms / speed-up of its "
                     "communication over mpi4py fp32 allreduce (STEP rows: of the whole step "
                     "over the SGD step with fp32 mpi4py allreduce).\n")
        head = "| method | " + " | ".join(f"n={n}, d={d / 1e6:.1f}M" for n, d in cols) + " |"
        lines += [head, "|---" * (len(cols) + 1) + "|"]
        for m, label in METHODS:
            cells = []
            for n, d in cols:
                r = idx.get((m, n, d, g))
                if r is None:
                    cells.append("-")
                    continue
                t = fmt_ms(r["seconds"])
                if abs(r.get("comm_seconds", r["seconds"]) - r["seconds"]) > 1e-9:
                    t += f" (comm {fmt_ms(r['comm_seconds'])})"
                t += f" / {fmt_ms(r.get('floor_seconds'))}"
                if m in STEPS:
                    sgd = idx.get(("sgd_step", n, d, g))
                    if sgd and m != "sgd_step":
                        t += f" / {sgd['seconds'] / r['seconds']:.2f}x"
                else:
                    base = r.get("fp32_allreduce_seconds")
                    comm = r.get("comm_seconds", r["seconds"])
                    if base and comm and m != "fp32_allreduce":
                        t += f" / {base / comm:.1f}x"
                cells.append(t)
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lat = sorted((r["n"], r["seconds"] / 40) for r in ok
                     if r["method"] == "latency_8B" and r["gbit_per_s"] == g)
        if lat:
            lines.append("\n8-byte message, half round trip rank 0 <-> 1 (20 round trips, median): "
                         + ", ".join(f"n={n}: {t * 1e6:.0f} us" for n, t in lat)
                         + " (grows with the ranks sharing the 2 cores)")
        loads = [r["loadavg_before"][0] for r in ok
                 if r["gbit_per_s"] == g and r.get("loadavg_before")]
        if loads:
            lines.append(f"\nLoad average (1 min) of the 2-core machine when these jobs started: "
                         f"{min(loads):.1f} to {max(loads):.1f} (other people's jobs included).")
    skipped = sorted({(r["method"], r["skipped"]) for r in records if r.get("skipped")})
    if skipped:
        lines.append("\nNot measured (hooks in benchmarks/netem_bench.py): "
                     + "; ".join(f"`{m}`: {why}" for m, why in skipped) + ".")
    return "\n".join(lines) + "\n"


def plots(records, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("seconds") is not None and r["d"] > 0]
    shown = [("fp32_allreduce", "C0"), ("hvd_fp32_allreduce", "C1"), ("hvd_fp16_allreduce", "C2"),
             ("vote_allgather_v1", "C3"), ("vote_sharded_v1", "C4"), ("vote_allreduce_v1", "C5"),
             ("signvote_sharded_v2", "C6")]
    labels = dict(METHODS)
    files = []
    for g in sorted({r["gbit_per_s"] for r in ok}):
        ds = sorted({r["d"] for r in ok if r["gbit_per_s"] == g})
        fig, axes = plt.subplots(1, len(ds), figsize=(6 * len(ds), 4.5), squeeze=False)
        for ax, d in zip(axes[0], ds):
            for m, color in shown:
                pts = sorted((r["n"], r["seconds"], r.get("comm_seconds"), r.get("floor_seconds"))
                             for r in ok if r["method"] == m and r["d"] == d and r["gbit_per_s"] == g)
                if not pts:
                    continue
                ns = [p[0] for p in pts]
                ax.plot(ns, [p[1] for p in pts], "o-", color=color, label=labels[m])
                if m.startswith(("vote_", "signvote_")):
                    ax.plot(ns, [p[2] for p in pts], "x:", color=color, alpha=0.8)
                if pts[0][3] and not m.startswith("signvote"):
                    ax.plot(ns, [p[3] for p in pts], "--", color=color, alpha=0.4, lw=1)
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xticks([2, 4, 8], ["2", "4", "8"])
            ax.set_xlabel("ranks n (one namespace each)")
            ax.set_ylabel("seconds per step")
            ax.set_title(f"{g:g} Gbit/s links, d = {d / 1e6:.1f}M")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7, loc="best",
                          title="solid: step, x: its comm, dashed: floor", title_fontsize=7)
        fig.tight_layout()
        path = Path(out) / f"netem_{g:g}gbit.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    records = load(a.results)
    md = table(records)
    (Path(a.results) / "netem_table.md").write_text(
        "### Emulated cluster: time per step (benchmarks/netem/run_bench.py)\n" + md)
    files = plots(records, a.results)
    print(f"report.py: {Path(a.results) / 'netem_table.md'}, " + ", ".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
