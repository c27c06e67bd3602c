#!/usr/bin/env python
"""Data-parallel training with signs instead of floats, and the baselines it is compared with.

    horovodrun -np 8 python mpi_examples/train.py --method mvsm-v1
    mpirun -np 8 python mpi_examples/train.py --method signsgd-mv --split skew2
    mpirun -np 8 python mpi_examples/train.py --method mvsm-v1 --split dirichlet --alpha 0.1
    python mpi_examples/train.py --method signum            # one process
    torchrun --nproc-per-node 4 mpi_examples/train.py --method mvsm-v1   # DDP + signcomm hook
    mpirun -np 8 python mpi_examples/train.py --grid method=mvsm-v1,signsgd-mv \\
        --grid lr=0.001,0.005 --grid seed=0,1 --out-dir runs/grid   # many runs, one launch

Launched by horovodrun the ranks talk through Horovod; launched by mpirun (or as one
process) through mpi4py, and Horovod is never imported (``--transport`` overrides); launched
by torchrun through torch.distributed, training through DDP (mpi_examples/ddp_run.py).
See docs/training.md for the flags, the methods and the metrics file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mpi_examples.cluster import default_thread_env  # noqa: E402
from mpi_examples import ddp_run as DDP  # noqa: E402  (torchrun, DDP methods)

DDP.thread_env()      # under torchrun: cores // local ranks threads each
default_thread_env()  # before torch and numba start their thread pools

from mpi_examples import data as D  # noqa: E402
from mpi_examples import methods as M  # noqa: E402
from mpi_examples import models as MOD  # noqa: E402
from mpi_examples.cluster import set_compute_threads  # noqa: E402
from mpi_examples.ddp_run import env_rank  # noqa: E402

PROG = "train.py"


class UsageError(ValueError):
    """Bad input: printed as one line on rank 0, exit status 2, no traceback."""


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error once (on rank 0), not once per rank."""

    def error(self, message):
        if env_rank() == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def print_help(self, file=None):
        if env_rank() == 0:
            super().print_help(file)


def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def seed_int(text):
    v = nonneg_int(text)
    if v >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {text}")
    return v


def check_output_paths(out_dir, metrics):
    """--out-dir and --metrics must be writable; checked on every rank alike before any
    collective (a failure on rank 0 alone would leave the others waiting)."""
    for flag, folder in (("--out-dir", out_dir), ("--metrics", Path(metrics).parent if metrics else None)):
        if folder is None:
            continue
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag}: {folder} exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{flag}: cannot create {folder} ({exc.strerror or exc})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{flag}: {folder} is not writable")
    if metrics:
        if Path(metrics).is_dir():
            raise UsageError(f"--metrics: {metrics} is a folder; give a file path")
        try:
            with open(metrics, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UsageError(f"--metrics: cannot write {metrics} ({exc.strerror or exc})") from None


def positive_float(text):
    v = float(text)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def beta_float(text):
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the weight of the new gradient; "
                                         f"1 = no momentum), got {text}")
    return v


def one_of(what, choices):
    """An argparse type accepting only ``choices`` (a word naming ``what``)."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose one of: "
                                             + ", ".join(choices))
        return text
    parse.__name__ = what
    return parse


method_name = one_of("method", tuple(DDP.METHODS))
schedule_name = one_of("schedule", ("allgather", "sharded", "allreduce"))  # signcomm.vote.SCHEDULES;
# signcomm is imported late (after the thread settings), so the names are spelled here
split_name = one_of("split", tuple(D.SPLITS))


def r_policy(text):
    """--R: "global", "local" or a positive number (a fixed R)."""
    if text in ("global", "local"):
        return text
    try:
        return positive_float(text)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be global, local or a positive number, "
                                         f"got {text!r}") from None


def bool_word(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# Keys a --grid / --plan may vary, with their parsers.
GRID_KEYS = {
    "method": method_name, "lr": positive_float, "beta": beta_float, "seed": nonneg_int,
    "schedule": schedule_name, "byzantine": nonneg_int, "heterogeneous": bool_word,
    "batch_size": positive_int, "epochs": positive_int, "weight_decay": float,
    "split": split_name, "alpha": positive_float, "R": r_policy,
}


def build_parser():
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Methods: " + ", ".join(DDP.METHODS))
    p.add_argument("--method", type=method_name, default="mvsm-v1", metavar="NAME",
                   help="training method (default mvsm-v1); see the list below")
    p.add_argument("--data", choices=D.DATASETS, default="digits",
                   help="digits (scikit-learn, offline; default) or the CIFAR python archives")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    p.add_argument("--model", choices=MOD.MODELS, default="cnn",
                   help="small CNN (default) or the CIFAR ResNet-18 / ResNet-50")
    p.add_argument("--schedule", type=schedule_name, default=None,
                   help="vote schedule of the majority-vote methods: allgather, sharded or "
                        "allreduce (default: the optimizer's)")
    p.add_argument("--transport", choices=("auto", "mpi", "horovod", "torch"), default="auto",
                   help="auto (default): Horovod when launched by horovodrun, "
                        "torch.distributed (DDP) by torchrun, else mpi4py")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: per method, see methods.DEFAULTS)")
    p.add_argument("--beta", type=beta_float, default=None,
                   help="weight of the NEW gradient in the momentum, the paper's beta "
                        "(1 = no momentum; PyTorch momentum = 1 - beta)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=16, help="per rank")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--train-samples", type=positive_int, default=None, metavar="N",
                   help="use only the first N training samples (quick trials)")
    p.add_argument("--split", type=split_name, default=None,
                   help="how the training set is shared out: iid (default), sorted "
                        "(label-sorted contiguous parts), skew2 (two label-sorted shards "
                        "per rank), dirichlet (class mixture per rank ~ Dirichlet(alpha))")
    p.add_argument("--alpha", type=positive_float, default=0.1,
                   help="concentration of --split dirichlet (default 0.1; smaller = more "
                        "skewed)")
    p.add_argument("--heterogeneous", action="store_true",
                   help="the same as --split sorted: each rank sees about classes/ranks labels")
    p.add_argument("--R", type=r_policy, default=None,
                   help="R of the S_R methods (mvsm-v1/v2, sto-signsgd, mv-sto-signsgd-sim): "
                        "global (the optimizer's default: max over ranks), local (this "
                        "rank's max) or a fixed number")
    p.add_argument("--hierarchy", choices=("host",), default=None,
                   help="host: the hierarchical vote of the majority-vote methods (MPI "
                        "transport): the ranks sharing a host average their gradients "
                        "exactly and the hosts vote, one bit each (docs/optim.md)")
    p.add_argument("--ranks-per-node", type=positive_int, default=None, metavar="K",
                   help="the hierarchical vote with machines of K ranks: machine m holds "
                        "ranks m*K .. m*K+K-1 (emulated clusters, tests)")
    p.add_argument("--byzantine", type=nonneg_int, default=0, metavar="K",
                   help="the last K ranks send inverted signs (gradients, for the fp32 "
                        "baselines)")
    p.add_argument("--metrics", default=None, metavar="PATH",
                   help="metrics file (JSON lines) of a single run")
    p.add_argument("--step-metrics", action="store_true",
                   help="also write one record per step to the metrics file")
    p.add_argument("--no-full-grad", dest="full_grad", action="store_false",
                   help="skip the full-batch gradient norms (they cost one pass over the data)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the product of these values in this one launch (keys: "
                        + ", ".join(GRID_KEYS) + "); repeatable")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="JSON list of runs, each a dict of the --grid keys")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="with --grid/--plan: one metrics file per run in DIR")
    p.add_argument("--progress", choices=("auto", "bar", "none"), default="auto",
                   help="progress bar on rank 0 (auto: on a terminal redrawn in place, "
                        "in logs one line per quarter epoch)")
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    return p


# ---------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    method: str
    lr: float
    beta: float | None
    seed: int
    schedule: str | None
    byzantine: int
    heterogeneous: bool
    batch_size: int
    epochs: int
    weight_decay: float
    split: str = "iid"
    alpha: float | None = None
    R: object = None  # None: the optimizer's default R policy
    varied: tuple = field(default=(), compare=False)  # the keys a grid varies

    def run_id(self) -> str:
        parts = [self.method, f"lr{self.lr:g}"]
        if self.beta is not None:
            parts.append(f"beta{self.beta:g}")
        if self.schedule:
            parts.append(self.schedule)
        if self.split == "sorted":
            parts.append("het")
        elif self.split == "dirichlet":
            parts.append(f"dir{self.alpha:g}")
        elif self.split != "iid":
            parts.append(self.split)
        if self.R is not None:
            parts.append(f"R{self.R:g}" if isinstance(self.R, float) else f"R{self.R}")
        if self.byzantine:
            parts.append(f"byz{self.byzantine}")
        if "batch_size" in self.varied:
            parts.append(f"bs{self.batch_size}")
        if "epochs" in self.varied:
            parts.append(f"ep{self.epochs}")
        if "weight_decay" in self.varied:
            parts.append(f"wd{self.weight_decay:g}")
        parts.append(f"seed{self.seed}")
        return "_".join(parts)


def base_config(args, **over) -> RunConfig:
    values = dict(method=args.method, lr=args.lr, beta=args.beta, seed=args.seed,
                  schedule=args.schedule, byzantine=args.byzantine,
                  heterogeneous=args.heterogeneous, batch_size=args.batch_size,
                  epochs=args.epochs, weight_decay=args.weight_decay,
                  split=args.split, alpha=args.alpha, R=args.R)
    values.update(over)
    return finish_config(RunConfig(**values))


def finish_config(cfg: RunConfig) -> RunConfig:
    """Fill the per-method defaults; drop beta where the method has no momentum; the
    split (--heterogeneous is --split sorted; alpha only for dirichlet)."""
    lr_default, beta_default = DDP.defaults(cfg.method)
    lr = cfg.lr if cfg.lr is not None else lr_default
    beta = cfg.beta if cfg.beta is not None else beta_default
    if not M.uses_beta(cfg.method):
        beta = None
    split = cfg.split
    if cfg.heterogeneous:
        if split not in (None, "iid", "sorted"):
            raise UsageError(f"--heterogeneous is --split sorted; it does not combine with "
                             f"--split {split}")
        split = "sorted"
    split = split or "iid"
    alpha = (cfg.alpha if cfg.alpha is not None else 0.1) if split == "dirichlet" else None
    return replace(cfg, lr=lr, beta=beta, split=split, alpha=alpha,
                   heterogeneous=split != "iid")


def parse_grid(items):
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS:
            raise UsageError(f"--grid {item!r}: expected KEY=V1,V2,... with KEY one of "
                             + ", ".join(GRID_KEYS))
        try:
            grid[key] = [GRID_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UsageError(f"--grid {key}: {exc}")
        if not grid[key]:
            raise UsageError(f"--grid {key}: no values")
    return grid


def read_plan(path):
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--plan {path}: {exc.strerror or exc}")
    except json.JSONDecodeError as exc:
        raise UsageError(f"--plan {path}: not JSON ({exc})")
    if not isinstance(plan, list) or not all(isinstance(r, dict) for r in plan):
        raise UsageError(f"--plan {path}: expected a JSON list of objects")
    runs = []
    for i, r in enumerate(plan):
        over = {}
        for k, v in r.items():
            key = k.replace("-", "_")
            if key not in GRID_KEYS:
                raise UsageError(f"--plan {path}: run {i}: unknown key {k!r}")
            try:
                over[key] = GRID_KEYS[key](str(v).lower() if isinstance(v, bool) else str(v))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"--plan {path}: run {i}: {k}: {exc}")
        runs.append(over)
    return runs


def expand_runs(args) -> list[RunConfig]:
    """One config, or the product of --grid (times each --plan entry), deduplicated."""
    grid = parse_grid(args.grid)
    plan = read_plan(args.plan) if args.plan else [{}]
    keys = list(grid)
    runs, seen = [], set()
    for over in plan:
        for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            values = dict(over)
            values.update(zip(keys, combo))
            cfg = base_config(args, **values)
            cfg = replace(cfg, varied=tuple(sorted(set(keys) | set(over))))
            key = tuple(getattr(cfg, k) for k in GRID_KEYS)
            if key not in seen:
                seen.add(key)
                runs.append(cfg)
    return runs


@dataclass
class RunResult:
    config: RunConfig
    model: object
    summary: dict
    metrics_path: str | None


def validate(cfg: RunConfig, cluster, share: int):
    """Checks that need the number of ranks; identical on every rank."""
    n = cluster.size
    fam = DDP.family(cfg.method)
    if cfg.byzantine:
        if n == 1:
            raise UsageError("--byzantine needs several ranks (launch with mpirun/horovodrun)")
        if cfg.byzantine >= n:
            raise UsageError(f"--byzantine {cfg.byzantine} of {n} ranks leaves no honest rank")
        if fam == "single":
            raise UsageError(f"--byzantine does not apply to the single-process {cfg.method}")
    if cfg.schedule is not None and fam not in ("vote",):
        raise UsageError(f"--schedule applies to the majority-vote methods "
                         f"({', '.join(M.VOTE_METHODS)}), not to {cfg.method}")
    if cfg.R is not None and fam != "vote":
        raise UsageError(f"--R applies to the S_R majority-vote methods, not to {cfg.method}")
    try:
        D.check_batch_size(cfg.batch_size, share, n)
    except D.DataError as exc:
        raise UsageError(str(exc))


def hierarchy_options(args) -> dict:
    """--hierarchy / --ranks-per-node as the optimizer's options (empty: a flat vote)."""
    out = {}
    if getattr(args, "hierarchy", None):
        out["hierarchy"] = args.hierarchy
    if getattr(args, "ranks_per_node", None):
        out["ranks_per_node"] = args.ranks_per_node
    return out


def with_r_policy(method, cfg: RunConfig, model, cluster, byzantine, extra=None):
    """--R (and --hierarchy / --ranks-per-node, ``extra``): rebuild the majority-vote
    method's optimizer with that R policy (the same options ``methods.SignCommMethod``
    passes, plus these).  The preset lock refuses R for the sign presets (signsgd-mv,
    signum-mv) with a ValueError."""
    import signcomm
    options = dict(transport=cluster.engine, seed=cfg.seed, **(extra or {}))
    if cfg.R is not None:
        options["R"] = cfg.R
    if M.uses_beta(cfg.method) and cfg.beta is not None:
        options["beta"] = cfg.beta
    if cfg.weight_decay:
        options["weight_decay"] = cfg.weight_decay
    if cfg.schedule is not None:
        options["schedule"] = cfg.schedule
    if byzantine:
        options["byzantine"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = signcomm.create_optimizer(cfg.method, params, lr=cfg.lr, **options)
    old, method.opt = method.opt, opt
    if hasattr(old, "close"):
        old.close()


def _layout_record(method):
    """The hierarchical vote's layout of a run (None for a flat vote)."""
    owner = getattr(method, "hook_state", None) or getattr(method, "opt", None)  # DDP hook / MVSM
    h = getattr(owner, "hierarchy", None)
    return None if h is None else dict(h.describe(), spec=h.spec)


def share_labels(data, n: int, cfg: RunConfig) -> list:
    """Samples per class of every rank's share (shares are a pure function of the
    labels, n and the seed, so rank 0 computes them all without communicating)."""
    return [D.label_histogram(data.y_train, D.shard(data.y_train, r, n, split=cfg.split,
                                                    alpha=cfg.alpha or 0.1, seed=cfg.seed),
                              data.num_classes) for r in range(n)]


def run_one(cfg: RunConfig, cluster, data, args, metrics_path, log) -> RunResult:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mpi_examples import metrics as MET

    rank, n = cluster.rank, cluster.size
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    try:
        train_idx = D.shard(data.y_train, rank, n, split=cfg.split, alpha=cfg.alpha or 0.1,
                            seed=cfg.seed)
    except D.DataError as exc:
        raise UsageError(str(exc))
    # evaluation covers the whole training and test sets, split over the ranks
    eval_train_idx = np.arange(rank, len(data.y_train), n)
    test_idx = np.arange(rank, len(data.y_test), n)
    validate(cfg, cluster, len(train_idx))

    model = MOD.build(args.model, data.shape, data.num_classes)
    cluster.broadcast_model(model)
    d = MOD.count_parameters(model)
    byzantine = rank >= n - cfg.byzantine
    fam = DDP.family(cfg.method)
    layout = hierarchy_options(args)
    if layout and fam != "vote":
        raise UsageError(f"--hierarchy / --ranks-per-node apply to the majority-vote methods "
                         f"({', '.join(M.VOTE_METHODS)}), not to {cfg.method}")
    if layout and cluster.engine == "horovod" and \
            os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0") in ("", "0"):
        raise UsageError("--hierarchy / --ranks-per-node under horovodrun make Horovod process "
                         "sets after hvd.init(): run with HOROVOD_DYNAMIC_PROCESS_SETS=1 "
                         "(export it before horovodrun)")
    try:
        method = DDP.create(cfg.method, model, cluster, lr=cfg.lr, beta=cfg.beta,
                            schedule=cfg.schedule, seed=cfg.seed,
                            byzantine=byzantine and fam == "vote",
                            weight_decay=cfg.weight_decay, R=cfg.R, layout=layout)
        if method is None:  # not through DDP
            method = M.create(cfg.method, model, cluster, lr=cfg.lr, beta=cfg.beta,
                              schedule=cfg.schedule, seed=cfg.seed,
                              byzantine=byzantine and fam == "vote", weight_decay=cfg.weight_decay)
            if cfg.R is not None or layout:
                with_r_policy(method, cfg, model, cluster, byzantine, layout)
    except ValueError as exc:  # the optimizer's own argument checks, alike on every rank
        raise UsageError(f"{cfg.method}: {exc}")
    # Faulty ranks of the other families invert what they send by inverting their gradient.
    loss_sign = -1.0 if (byzantine and fam != "vote") else 1.0
    net = getattr(method, "module", model)  # DDP methods: forward through the DDP model
    steps = D.steps_per_epoch(len(train_idx), cfg.batch_size)

    writer = MET.MetricsWriter(metrics_path if rank == 0 else None)
    config_rec = dict(run_id=cfg.run_id(), method=cfg.method, lr=cfg.lr, beta=cfg.beta,
                      seed=cfg.seed, schedule=cfg.schedule, byzantine=cfg.byzantine,
                      heterogeneous=cfg.heterogeneous, split=cfg.split, alpha=cfg.alpha,
                      R=cfg.R, batch_size=cfg.batch_size,
                      epochs=cfg.epochs, weight_decay=cfg.weight_decay, ranks=n,
                      hierarchy=_layout_record(method),
                      engine=cluster.engine, data=args.data, model=args.model,
                      num_params=d, train_samples=len(data.y_train),
                      train_share=len(train_idx), test_samples=len(data.y_test),
                      share_labels=share_labels(data, n, cfg),
                      steps_per_epoch=steps, wire=method.wire,
                      fp32_allreduce_bytes_per_step=M.fp32_allreduce_bytes(d, n))
    writer.write("config", **config_rec)

    t_eval = time.perf_counter()
    ev = MET.evaluate(model, data, eval_train_idx, test_idx, cluster, full_grad=args.full_grad)
    rec = dict(epoch=0, step=0, **ev, train_loss_running=None, bytes_sent=0, bytes_received=0,
               bytes_sent_max=0, bytes_received_max=0, bytes_sent_total=0,
               bytes_received_total=0, time_compute_s=0.0, time_compress_s=0.0,
               time_comm_s=0.0, time_vote_s=0.0, time_update_s=0.0,
               time_eval_s=time.perf_counter() - t_eval, epoch_wall_s=0.0)
    writer.write("epoch", **rec)
    log(MET.epoch_line("", rec))
    totals = dict(sent=0, received=0)
    step = 0
    diverged = False
    wall0 = time.perf_counter()
    x_train = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        meter = MET.EpochMeter()
        bar = MET.ProgressBar(steps, f"epoch {epoch}/{cfg.epochs}",
                              enabled=(rank == 0 and args.progress != "none" and not args.quiet
                                       and (args.progress == "bar" or sys.stderr.isatty()
                                            or len(args._runs) == 1)))
        for idx in D.batches(train_idx, cfg.batch_size, cfg.seed, epoch, rank):
            t0 = time.perf_counter()
            method.zero_grad()
            xb, yb = x_train[idx], y_train[idx]
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            (loss * loss_sign).backward()
            compute_s = time.perf_counter() - t0
            stats = method.step()
            step += 1
            lval = float(loss.detach())
            meter.add(compute_s, stats, lval)
            if args.step_metrics:
                acc = float((out.detach().argmax(1) == yb).float().mean())
                vec = [lval, acc, stats["bytes_sent"], stats["bytes_received"], compute_s,
                       stats["compress_s"], stats["comm_s"], stats["vote_s"], stats["update_s"]]
                mean = cluster.allreduce(vec) / n
                writer.write("step", epoch=epoch, step=step, loss=mean[0], acc=mean[1],
                             bytes_sent=int(round(mean[2])), bytes_received=int(round(mean[3])),
                             time_compute_s=mean[4], time_compress_s=mean[5],
                             time_comm_s=mean[6], time_vote_s=mean[7], time_update_s=mean[8])
            bar.update(lval)
        red = meter.reduce(cluster)
        t_eval = time.perf_counter()
        ev = MET.evaluate(model, data, eval_train_idx, test_idx, cluster, full_grad=args.full_grad)
        totals["sent"] += red["bytes_sent"]
        totals["received"] += red["bytes_received"]
        rec = dict(epoch=epoch, step=step, **ev, **red, bytes_sent_total=totals["sent"],
                   bytes_received_total=totals["received"],
                   time_eval_s=time.perf_counter() - t_eval,
                   epoch_wall_s=time.perf_counter() - t_epoch)
        writer.write("epoch", **rec)
        log(MET.epoch_line("", rec))
        if not math.isfinite(ev["train_loss"]):
            diverged = True
            log(f"{cfg.run_id()}: the training loss is not finite at epoch {epoch}: stopping "
                "this run (lower --lr)")
            break
    summary = dict(run_id=cfg.run_id(), method=cfg.method, lr=cfg.lr, beta=cfg.beta,
                   seed=cfg.seed, epochs=rec["epoch"], steps=step, ranks=n, num_params=d,
                   final_train_loss=rec["train_loss"], final_train_acc=rec["train_acc"],
                   final_test_acc=rec["test_acc"], final_test_loss=rec["test_loss"],
                   final_grad_l1=rec["grad_l1"], final_grad_l2=rec["grad_l2"],
                   bytes_sent_per_rank=totals["sent"], bytes_received_per_rank=totals["received"],
                   bytes_sent_per_rank_per_step=totals["sent"] / max(step, 1),
                   fp32_allreduce_bytes_per_rank=M.fp32_allreduce_bytes(d, n) * step,
                   wall_s=time.perf_counter() - wall0, diverged=diverged,
                   byzantine=cfg.byzantine, heterogeneous=cfg.heterogeneous,
                   split=cfg.split, alpha=cfg.alpha, R=cfg.R)
    writer.write("summary", **summary)
    writer.close()
    return RunResult(cfg, model, summary, metrics_path)


def final_report(results, log_always):
    from mpi_examples.metrics import human_bytes
    if len(results) == 1:
        s = results[0].summary
        fp32 = s["fp32_allreduce_bytes_per_rank"]
        sent = s["bytes_sent_per_rank"]
        if s["ranks"] == 1:
            moved = "one process: nothing sent"
        else:
            moved = (f"sent {human_bytes(sent)} per rank; an fp32 ring allreduce of the same "
                     f"{s['num_params']} gradients over {s['steps']} steps sends "
                     f"{human_bytes(fp32)} per rank"
                     + (f", {fp32 / sent:.1f}x as much" if sent else ""))
        log_always(f"final: {s['method']} on {s['ranks']} rank(s), {s['epochs']} epochs: "
                   f"test accuracy {s['final_test_acc']:.4f}, train loss "
                   f"{s['final_train_loss']:.4f}; {moved}")
        return
    log_always(f"{'run':<44} {'test acc':>8} {'loss':>8} {'sent/rank':>11} {'vs fp32':>8}")
    for r in results:
        s = r.summary
        fp32 = s["fp32_allreduce_bytes_per_rank"]
        sent = s["bytes_sent_per_rank"]
        ratio = f"{sent / fp32:.3f}x" if fp32 else "-"
        log_always(f"{s['run_id']:<44} {s['final_test_acc']:>8.4f} "
                   f"{s['final_train_loss']:>8.4f} {human_bytes(sent):>11} {ratio:>8}")


def main(argv=None) -> list[RunResult]:
    """Parse ``argv``, run every configuration, return the results (raises UsageError)."""
    args = build_parser().parse_args(argv)
    runs = expand_runs(args)
    args._runs = runs
    many = len(runs) > 1
    if args.metrics and many:
        raise UsageError("--metrics names one file: with --grid/--plan use --out-dir DIR")
    if args.data == "digits" and args.data_dir is not None:
        raise UsageError("--data-dir applies to --data cifar10/cifar100 (digits ship with "
                         "scikit-learn)")
    check_output_paths(args.out_dir, args.metrics)
    try:
        dataset = D.load(args.data, args.data_dir)  # every rank alike, before any collective
    except D.DataError as exc:
        raise UsageError(str(exc))
    if args.train_samples is not None:
        dataset = D.limit_train(dataset, args.train_samples)
    set_compute_threads()
    try:
        cluster = DDP.make_cluster(args.transport)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc))
    if cluster.size > len(dataset.y_train):
        raise UsageError(f"{cluster.size} ranks but only {len(dataset.y_train)} training samples "
                         f"in {args.data}: launch at most {len(dataset.y_train)} ranks")
    rank0 = cluster.rank == 0

    def log(msg):
        if rank0 and not args.quiet:
            print(msg, flush=True)

    def log_always(msg):
        if rank0:
            print(msg, flush=True)

    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None and rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.metrics and rank0:
        Path(args.metrics).resolve().parent.mkdir(parents=True, exist_ok=True)
    results = []
    for i, cfg in enumerate(runs):
        path = args.metrics if not many else (str(out_dir / f"{cfg.run_id()}.jsonl")
                                              if out_dir else None)
        if not many and path is None and out_dir is not None:
            path = str(out_dir / f"{cfg.run_id()}.jsonl")
        log(f"== run {i + 1}/{len(runs)}: {cfg.run_id()} on {cluster.size} rank(s), engine "
            f"{cluster.engine}")
        try:
            results.append(run_one(cfg, cluster, dataset, args, path, log))
        except (UsageError, M.MethodError) as exc:
            raise UsageError(str(exc))
    final_report(results, log_always)
    return results


def cli(argv=None) -> int:
    try:
        main(argv)
    except UsageError as exc:
        if env_rank() == 0:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
