#!/usr/bin/env python
"""The paper's two experiments (section 5) in miniature, on scikit-learn's digits, and
the heterogeneous case its distributed theory is about:

1. centralized, one process: Signum, signSGD, SGDM, AdamW (the paper: ResNet-18 on
   CIFAR-10, Figure 1);
2. distributed, 8 ranks (mpirun, mpi4py), i.i.d. shares: MVSM v1/v2, signSGD-MV,
   Signum-MV, Sto-signSGD, MV-sto-signSGD-SIM and SGDM over an fp32 allreduce (the paper:
   ResNet-50 on CIFAR-100, Figure 2); plus the majority-vote methods with 2 of 8 ranks
   Byzantine;
3. heterogeneous, 8 ranks, label-skewed shares (default: each rank's class mixture drawn
   from Dirichlet(alpha = 0.1), train.py --split dirichlet): the same methods and
   protocol, plus MVSM-v1 with a per-rank ("local") R.  The theory: signSGD-MV follows
   the median of the ranks' gradient signs, MVSM with a shared R their mean; a local R
   weights each rank by 1/R_j.

MV-sto-signSGD-SIM is MVSM-v1 at a = 0 (the paper, section 4.2) up to the momentum's
start: v_0 = 0 (so v_1 = beta g_1) against MVSM's v_1 = g_1; the tables list both.

Each experiment is a small grid over beta and lr (seed 0), then the best setting of each
method (highest final test accuracy, ties by lower training loss) again with more seeds;
the figures show mean and +-1 std over those seeds.  Many runs share one launch
(train.py --plan; the i.i.d. and heterogeneous arms share theirs), so the 7-s start of an
8-rank torch job is paid twice, not once per run.

    python scripts/compare.py                 # `make compare`: results/compare/
    python scripts/compare.py --quick         # a smaller grid, for a smoke test
    python scripts/compare.py --skip-centralized --skip-iid --split skew2 --out DIR

Outputs in --out: results.md (tables), centralized.png, distributed.png, byzantine.png,
heterogeneous.png, best.json; the metrics files of every run go to --runs-dir
(runs/compare/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from signcomm import plot as P  # noqa: E402

TRAIN = ROOT / "mpi_examples" / "train.py"

# The grids (the paper: beta in {0.9, 0.5, 0.1, 0.01}, lr in {5, 2.5, 1, 0.5, 0.25,
# 0.1} x 1e-3, for every optimizer).  Sign methods move every coordinate by lr per
# step, so their lr is on the paper's scale; SGDM/AdamW get their own ranges.
SIGN_LR = [0.02, 0.01, 0.005]
BETAS = [0.5, 0.1]
GRIDS = {
    "centralized": {
        "signum": dict(lr=SIGN_LR, beta=BETAS),
        "signsgd": dict(lr=SIGN_LR),
        "sgdm": dict(lr=[0.1, 0.05, 0.02], beta=[0.1]),
        "adamw": dict(lr=[0.005, 0.002, 0.001], beta=[0.1]),
    },
    "distributed": {
        "mvsm-v1": dict(lr=SIGN_LR, beta=BETAS),
        "mvsm-v2": dict(lr=SIGN_LR, beta=BETAS),
        "signsgd-mv": dict(lr=SIGN_LR),
        "signum-mv": dict(lr=SIGN_LR, beta=BETAS),
        "sto-signsgd": dict(lr=SIGN_LR),
        "mv-sto-signsgd-sim": dict(lr=SIGN_LR, beta=BETAS),
        "sgdm": dict(lr=[0.1, 0.05, 0.02], beta=[0.1]),
    },
}
# The heterogeneous arm: every distributed method, plus MVSM-v1 with a per-rank R (the
# grid's keys are labels; "method" and "R" say what runs).
GRIDS["heterogeneous"] = dict(GRIDS["distributed"])
GRIDS["heterogeneous"]["mvsm-v1 (R=local)"] = dict(method="mvsm-v1", R="local", lr=SIGN_LR,
                                                   beta=BETAS)
QUICK_GRIDS = {name: {m: {k: (v[:1] if isinstance(v, list) else v) for k, v in g.items()}
                      for m, g in grid.items()} for name, grid in GRIDS.items()}
VOTE_METHODS = ("mvsm-v1", "mvsm-v2", "signsgd-mv", "signum-mv", "sto-signsgd",
                "mv-sto-signsgd-sim")


def expand(grid, seed, schedule=None):
    runs = []
    for label, axes in grid.items():
        method = axes.get("method", label)
        for lr in axes["lr"]:
            for beta in axes.get("beta", [None]):
                run = {"method": method, "lr": lr, "seed": seed}
                if beta is not None:
                    run["beta"] = beta
                if axes.get("R") is not None:
                    run["R"] = axes["R"]
                if schedule and method in VOTE_METHODS:
                    run["schedule"] = schedule
                runs.append(run)
    return runs


def label(cfg):
    """The row name of a run: its method, and its R policy where one was set."""
    return cfg["method"] + (f" (R={cfg['R']})" if cfg.get("R") is not None else "")


def bin_path(name):
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def launch(ranks, plan, out_dir, common, log, env=None):
    """train.py --plan on ``ranks`` ranks (mpirun; one plain process when ranks == 1)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    cmd = [sys.executable, str(TRAIN), "--plan", str(plan_path), "--out-dir", str(out_dir),
           "--progress", "none", "--quiet", *common]
    if ranks > 1:
        cmd = [bin_path("mpirun"), "-np", str(ranks)] + cmd
    log(f"$ {' '.join(cmd[:4])} ... ({len(plan)} runs, {ranks} rank(s))")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(ROOT), text=True, capture_output=True,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"compare: a launch failed (exit {proc.returncode}); see above")
    log(f"  done in {time.time() - t0:.0f} s")
    return proc.stdout


def summaries(folder):
    out = []
    for run in P.load_runs([folder]):
        s = run["summary"] or {}
        out.append(dict(run=run, cfg=run["config"], s=s))
    return out


def pick_best(runs):
    """Best run per method: highest final test accuracy, then lowest training loss."""
    best = {}
    for r in runs:
        s = r["s"]
        acc = s.get("final_test_acc")
        loss = s.get("final_train_loss")
        if acc is None or s.get("diverged"):
            continue
        key = (acc, -(loss if loss is not None else math.inf))
        m = label(r["cfg"])
        if m not in best or key > best[m][0]:
            best[m] = (key, r)
    return {m: r for m, (_, r) in best.items()}


def setting(cfg):
    d = {"method": cfg["method"], "lr": cfg["lr"]}
    if cfg.get("beta") is not None:
        d["beta"] = cfg["beta"]
    if cfg.get("schedule"):
        d["schedule"] = cfg["schedule"]
    if cfg.get("R") is not None:
        d["R"] = cfg["R"]
    if cfg.get("split") not in (None, "iid"):
        d["split"] = cfg["split"]
        if cfg.get("alpha") is not None:
            d["alpha"] = cfg["alpha"]
    return d


def stats(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def human(b):
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000


def table(rows_by_method, title, ranks):
    lines = [f"### {title}", "",
             "| method | lr | beta | seeds | test acc (mean +- std) | train loss | "
             "sent per rank per step | sent per rank, whole run | vs fp32 allreduce |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, runs in rows_by_method.items():
        cfg = runs[0]["cfg"]
        acc = stats([r["s"].get("final_test_acc") for r in runs])
        loss = stats([r["s"].get("final_train_loss") for r in runs])
        sent = stats([r["s"].get("bytes_sent_per_rank") for r in runs])[0]
        per_step = stats([r["s"].get("bytes_sent_per_rank_per_step") for r in runs])[0]
        fp32 = stats([r["s"].get("fp32_allreduce_bytes_per_rank") for r in runs])[0]
        if ranks > 1 and sent:
            ratio = "(is fp32)" if abs(fp32 / sent - 1) < 1e-9 else f"{fp32 / sent:.1f}x less"
        else:
            ratio = "-"
        beta = "-" if cfg.get("beta") is None else f"{cfg['beta']:g}"
        lines.append(f"| {method} | {cfg['lr']:g} | {beta} | {len(runs)} | "
                     f"{acc[0]:.4f} +- {acc[1]:.4f} | {loss[0]:.4f} +- {loss[1]:.4f} | "
                     f"{human(per_step) if ranks > 1 else '-'} | "
                     f"{human(sent) if ranks > 1 else '-'} | {ratio} |")
    return "\n".join(lines)


def grid_table(runs, title):
    lines = [f"#### {title}: every grid run (seed 0)", "",
             "| method | lr | beta | test acc | train loss |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (label(r["cfg"]), -r["cfg"]["lr"],
                                          -(r["cfg"].get("beta") or 0))):
        s, cfg = r["s"], r["cfg"]
        beta = "-" if cfg.get("beta") is None else f"{cfg['beta']:g}"
        acc = s.get("final_test_acc")
        loss = s.get("final_train_loss")
        lines.append(f"| {label(cfg)} | {cfg['lr']:g} | {beta} | "
                     f"{'n/a' if acc is None else f'{acc:.4f}'} | "
                     f"{'n/a' if loss is None else f'{loss:.4f}'} |")
    return "\n".join(lines)


def split_summary(runs, num_classes=10):
    """How skewed the heterogeneous shares are, from a run's config (seed 0): per rank,
    the classes that make up at least 10% of its share, largest first."""
    for r in runs:
        hist = r["cfg"].get("share_labels")
        if hist and r["cfg"].get("seed") == 0:
            parts = []
            for j, h in enumerate(hist):
                total = sum(h)
                top = sorted(((c, k) for c, k in enumerate(h) if k >= 0.1 * total),
                             key=lambda x: -x[1])
                present = sum(1 for k in h if k)
                parts.append(f"rank {j}: " + ", ".join(f"{c} ({k / total:.0%})" for c, k in top)
                             + f" [{present} classes]")
            return "; ".join(parts)
    return None


def versus_table(iid_rows, het_rows, split_name):
    """Final test accuracy per method, i.i.d. against heterogeneous shares."""
    lines = [f"### I.i.d. against {split_name} shares (8 ranks, mean over seeds)", "",
             "| method | i.i.d. test acc | heterogeneous test acc | change | "
             "heterogeneous train loss |", "| --- | --- | --- | --- | --- |"]
    order = sorted(het_rows, key=lambda m: -stats([r["s"].get("final_test_acc")
                                                    for r in het_rows[m]])[0])
    for m in order:
        het = stats([r["s"].get("final_test_acc") for r in het_rows[m]])
        loss = stats([r["s"].get("final_train_loss") for r in het_rows[m]])
        iid = stats([r["s"].get("final_test_acc") for r in iid_rows[m]]) if m in iid_rows else None
        iid_txt = f"{iid[0]:.4f} +- {iid[1]:.4f}" if iid else "-"
        change = f"{het[0] - iid[0]:+.4f}" if iid else "-"
        lines.append(f"| {m} | {iid_txt} | {het[0]:.4f} +- {het[1]:.4f} | {change} | "
                     f"{loss[0]:.4f} +- {loss[1]:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "compare"),
                    help="tables and figures (default results/compare)")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "compare"),
                    help="metrics files of every run (default runs/compare, git-ignored)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--central-batch-size", type=int, default=None,
                    help="batch of the one-process runs (default: ranks x batch size, the "
                         "distributed runs' global batch, so both make the same steps)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the best settings")
    ap.add_argument("--byzantine", type=int, default=2)
    ap.add_argument("--schedule", default="sharded",
                    help="vote schedule of the majority-vote methods (default sharded: "
                         "1 bit up, 1 bit down)")
    ap.add_argument("--split", default="dirichlet", choices=("sorted", "skew2", "dirichlet"),
                    help="the heterogeneous arm's split (train.py --split; default dirichlet)")
    ap.add_argument("--alpha", type=float, default=0.1,
                    help="Dirichlet concentration of --split dirichlet (default 0.1)")
    ap.add_argument("--quick", action="store_true", help="one setting per method, 1 seed")
    ap.add_argument("--skip-centralized", action="store_true")
    ap.add_argument("--skip-iid", action="store_true", help="skip the i.i.d. distributed arm")
    ap.add_argument("--skip-heterogeneous", action="store_true")
    args = ap.parse_args(argv)
    grids = QUICK_GRIDS if args.quick else GRIDS
    seeds = 1 if args.quick else args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    split_name = (f"Dirichlet(alpha = {args.alpha:g})" if args.split == "dirichlet"
                  else {"skew2": "two-shard (skew2)", "sorted": "label-sorted"}[args.split])
    split_args = ["--split", args.split] + (["--alpha", str(args.alpha)]
                                            if args.split == "dirichlet" else [])
    central_bs = args.central_batch_size or args.ranks * args.batch_size
    report = [f"# make compare: the paper's experiments in miniature on digits", "",
              f"Digits (1438 train / 359 test images, 8x8), small CNN "
              f"(38,282 parameters), {args.epochs} epochs; batch {args.batch_size} per "
              f"rank on {args.ranks} ranks, {central_bs} in the one-process runs (the same "
              f"global batch, so the same number of steps). Grid: beta in {BETAS}, sign lr in {SIGN_LR} (SGDM and AdamW: their own "
              f"lr ranges); best setting per method = highest final test accuracy of "
              f"seed 0, then rerun with {seeds} seed(s). Vote schedule: {args.schedule}. "
              f"The heterogeneous arm splits the training set over the ranks by "
              f"{split_name} (train.py {' '.join(split_args)}).", "",
              "MV-sto-signSGD-SIM is MVSM-v1 at a = 0 (the paper, section 4.2) up to where "
              "the momentum starts: v_0 = 0, so v_1 = beta g_1, against MVSM's v_1 = g_1; "
              "both are listed, and any gap between them comes from that first step and "
              "from the grid picking other settings.", ""]
    best_all, rows_all, timings = {}, {}, []
    # arms with the same number of ranks share their launches (one for the grids, one for
    # the seeds), so the start of an 8-rank torch job is paid twice, not four times
    het_keys = {"split": args.split, **({"alpha": args.alpha} if args.split == "dirichlet" else {})}
    arms = [] if args.skip_centralized else [("centralized", 1, {})]
    if not args.skip_iid:
        arms.append(("distributed", args.ranks, {}))
    if not args.skip_heterogeneous:
        arms.append(("heterogeneous", args.ranks, het_keys))
    # one compute thread per process (the tiny CNN gains nothing from more); a rank that
    # waits in MPICH sleeps (usleep(1)) after each poll that made no progress instead of
    # spinning, so the 8 ranks that share 2 cores leave them to the ranks still computing
    # (3 runs on a loaded box: CPU 48-50 s against 80-87 s spinning; results unchanged)
    env = {"OMP_NUM_THREADS": "1", "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
           "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1"}

    def arm_of(cfg, ranks):
        if ranks == 1:
            return "centralized"
        return "distributed" if cfg.get("split") in (None, "iid") else "heterogeneous"

    for ranks in sorted({r for _, r, _ in arms}):
        group = [(name, extra) for name, r, extra in arms if r == ranks]
        kind = "centralized" if ranks == 1 else f"{ranks}-rank"
        t_grid = time.time()
        bs = args.batch_size if ranks > 1 else central_bs
        common = ["--epochs", str(args.epochs), "--batch-size", str(bs)]
        log(f"== {', '.join(n for n, _ in group)} ({ranks} rank(s)): grid")
        plan = [dict(run, **extra) for name, extra in group
                for run in expand(grids[name], 0, args.schedule if ranks > 1 else None)]
        grid_dir = runs_dir / kind / "grid"
        launch(ranks, plan, grid_dir, common, log, env)
        grid_all = summaries(grid_dir)
        timings.append(f"{kind} grid {time.time() - t_grid:.0f} s")
        grids_of, best_of, plan = {}, {}, []
        for name, _ in group:
            grid = [r for r in grid_all if arm_of(r["cfg"], ranks) == name]
            best = pick_best(grid)
            missing = set(grids[name]) - set(best)
            if missing:
                log(f"  {name}: no usable run for {sorted(missing)} (all diverged?)")
            grids_of[name], best_of[name] = grid, best
            best_all[name] = {m: setting(r["cfg"]) for m, r in best.items()}
            plan += [dict(setting(r["cfg"]), seed=s) for r in best.values()
                     for s in range(1, seeds)]
            if name == "distributed" and args.byzantine:
                plan += [dict(setting(best[m]["cfg"]), seed=s, byzantine=args.byzantine)
                         for m in VOTE_METHODS if m in best for s in range(seeds)]
        t_seeds = time.time()
        seeds_dir = runs_dir / kind / "seeds"
        if plan:
            log(f"== {', '.join(n for n, _ in group)}: best settings with more seeds"
                + (f", and {args.byzantine} Byzantine ranks" if ranks > 1 and args.byzantine
                   and not args.skip_iid else ""))
            launch(ranks, plan, seeds_dir, common, log, env)
            timings.append(f"{kind} seeds {time.time() - t_seeds:.0f} s")
        more_all = summaries(seeds_dir) if plan else []
        for name, _ in group:
            grid, best = grids_of[name], best_of[name]
            more = [x for x in more_all if arm_of(x["cfg"], ranks) == name]
            rows = {}
            for m, r in best.items():
                rows[m] = [r] + [x for x in more if setting(x["cfg"]) == setting(r["cfg"])
                                 and not x["cfg"].get("byzantine")]
            rows_all[name] = rows
            fig_runs = [x["run"] for rs in rows.values() for x in rs]
            fig = out / f"{name}.png"
            where = f", {split_name} shares" if name == "heterogeneous" else ""
            P.plot(P.group_runs(fig_runs, ("method", "R")), fig,
                   title=f"{name}: digits, {ranks} rank(s){where}, best grid setting per "
                         f"method, {seeds} seed(s)")
            title = f"{name.capitalize()} ({ranks} rank(s){where})"
            report += [table(rows, title, ranks), "", f"![{name}]({fig.name})", ""]
            if name == "heterogeneous":
                shares = split_summary(grid)
                if shares:
                    report += [f"Shares of seed 0 (classes with at least 10% of a rank's "
                               f"share): {shares}.", ""]
                if "distributed" in rows_all:
                    report += [versus_table(rows_all["distributed"], rows, split_name), ""]
            byz = {}
            for x in more:
                if x["cfg"].get("byzantine"):
                    byz.setdefault(label(x["cfg"]), []).append(x)
            if byz:
                fig = out / "byzantine.png"
                P.plot(P.group_runs([x["run"] for rs in byz.values() for x in rs]), fig,
                       title=f"{args.byzantine} of {ranks} ranks Byzantine (inverted signs)")
                report += [table(byz, f"{args.byzantine} of {ranks} ranks Byzantine "
                                 "(they send inverted signs)", ranks), "",
                           f"![byzantine]({fig.name})", ""]
            report += [grid_table(grid, name.capitalize()), ""]
    report.append(f"Total time: {time.time() - t_start:.0f} s on {os.cpu_count()} core(s) "
                  f"({', '.join(timings)}).")
    (out / "results.md").write_text("\n".join(report) + "\n")
    (out / "best.json").write_text(json.dumps(best_all, indent=1))
    log("\n".join(report))
    log(f"\nwrote {out / 'results.md'} and the figures in {out}")


if __name__ == "__main__":
    main()
