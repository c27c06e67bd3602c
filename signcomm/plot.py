"""The paper's figure panels from training metrics files.

    python -m signcomm.plot runs/compare/distributed/*.jsonl -o figure.png
    python -m signcomm.plot runs/grid/ -o grid.png --label method,lr,beta

Reads the JSON-lines metrics files that ``mpi_examples/train.py`` writes (a ``config``
record, then one ``epoch`` record per epoch) and draws four panels against epochs, as in
the paper's Figures 1 and 2: training loss, accuracy (test by default), and the l1 and l2
norms of the full-batch gradient.  Runs with the same label (by default the method; runs
that differ only by seed) are one curve: the mean over the runs, with a band of +-1
standard deviation (the paper's "shaded regions").

Needs matplotlib (``pip install signcomm[examples]``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANELS = (  # (field, title, log scale)
    ("train_loss", "training loss", True),
    ("{acc}_acc", "{acc} accuracy", False),
    ("grad_l1", "l1 norm of the full gradient", True),
    ("grad_l2", "l2 norm of the full gradient", True),
)


class PlotError(ValueError):
    """Bad input for the plot (no runs, unreadable files)."""


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def find_metric_files(paths) -> list[Path]:
    """The ``.jsonl`` files named, or found directly inside the folders named."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise PlotError(f"{p}: no such file or directory")
    if not files:
        raise PlotError("no metrics files (*.jsonl) in " + ", ".join(map(str, paths)))
    return files


def load_run(path) -> dict:
    """``{"path", "config", "epochs": [records sorted by epoch], "summary"}``."""
    config, epochs, summary = {}, [], None
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PlotError(f"{path}:{i}: not JSON ({exc.msg})") from None
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "config":
                config = rec
            elif kind == "epoch":
                epochs.append(rec)
            elif kind == "summary":
                summary = rec
    if not epochs:
        raise PlotError(f"{path}: no epoch records (is it a train.py metrics file?)")
    epochs.sort(key=lambda r: r["epoch"])
    return {"path": str(path), "config": config, "epochs": epochs, "summary": summary}


def load_runs(paths) -> list[dict]:
    return [load_run(p) for p in find_metric_files(paths)]


def run_label(run, keys) -> str:
    cfg = run["config"]
    if keys == ["run"]:
        return cfg.get("run_id") or Path(run["path"]).stem
    parts = []
    for k in keys:
        v = cfg.get(k)
        if k == "method":
            parts.append(str(v if v is not None else Path(run["path"]).stem))
        elif v is not None and v is not False:
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or Path(run["path"]).stem


def group_runs(runs, keys=("method",)) -> dict:
    """Label -> list of runs, in first-seen order."""
    groups = {}
    for run in runs:
        groups.setdefault(run_label(run, list(keys)), []).append(run)
    return groups


def _value(rec, field):
    v = rec.get(field)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def mean_spread(group, field):
    """(epochs, mean, std) of ``field`` over the runs of a group, per epoch; an epoch
    counts the runs that reached it (a diverged run stops contributing)."""
    by_epoch = {}
    for run in group:
        for rec in run["epochs"]:
            v = _value(rec, field)
            if not math.isnan(v):
                by_epoch.setdefault(rec["epoch"], []).append(v)
    epochs = sorted(by_epoch)
    means, stds = [], []
    for e in epochs:
        vals = by_epoch[e]
        m = sum(vals) / len(vals)
        var = sum((v - m) ** 2 for v in vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(var))
    return epochs, means, stds


# ---------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------
def plot(groups: dict, out, *, accuracy="test", title=None, dpi=120):
    """Draw the four panels for ``groups`` (label -> runs) into ``out`` (PNG, PDF, SVG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError(f"signcomm.plot needs matplotlib ({exc}): pip install matplotlib")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (field, name, log) in zip(axes, PANELS):
        field = field.format(acc=accuracy)
        name = name.format(acc=accuracy)
        drawn = False
        for label, group in groups.items():
            xs, mean, std = mean_spread(group, field)
            if not xs:
                continue
            n = len(group)
            line, = ax.plot(xs, mean, label=f"{label} (n={n})" if n > 1 else label, lw=1.6)
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            if log:
                lo = [max(v, m * 1e-3) if m > 0 else v for v, m in zip(lo, mean)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            drawn = True
        if log and drawn and all(v > 0 for g in groups.values()
                                 for v in mean_spread(g, field)[1]):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95 if title else 1))
    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return str(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m signcomm.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUNS",
                   help="metrics files (.jsonl) or folders of them")
    p.add_argument("-o", "--output", required=True, help="figure file (.png, .pdf, .svg)")
    p.add_argument("--label", default="method",
                   help="config fields that name a curve, comma-separated (default: method; "
                        "'run' = one curve per file); runs with the same label are averaged")
    p.add_argument("--accuracy", choices=("test", "train"), default="test",
                   help="which accuracy the second panel shows (default: test)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        groups = group_runs(runs, [k.strip() for k in args.label.split(",") if k.strip()])
        out = plot(groups, args.output, accuracy=args.accuracy, title=args.title)
    except (PlotError, OSError) as exc:
        sys.stderr.write(f"signcomm.plot: error: {exc}\n")
        return 2
    print(f"wrote {out}: {len(groups)} curve(s) from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
