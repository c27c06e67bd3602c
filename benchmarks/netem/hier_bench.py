#!/usr/bin/env python3
"""The hierarchical vote on machines of several ranks (docs/netem.md, issue 17): bytes per
rank that cross machines and step time, on the emulated cluster with H machines of k
ranks (shared memory inside a machine, a shaped link between machines).

    sudo .venv/bin/python benchmarks/netem/hier_bench.py            # H = 4, k = 2, 1 Gbit/s, d = 25.6M
    sudo .venv/bin/python benchmarks/netem/hier_bench.py --scale 0.05 --reps 2   # quick look

One cluster (cluster.py, ``ranks_per_machine=k``) and, in it, one run of three MPI jobs:

1. mpi4py, the methods timed in turns (repetition i runs each once, the first one
   rotating, so load swings hit them alike):

   - ``mvsm_flat``: ``signcomm.MVSM(variant="v1", schedule="sharded")`` over all n = H k
     ranks (``hierarchy=None``);
   - ``mvsm_hier``: the same with ``hierarchy="host"`` (machines from
     ``MPI.COMM_TYPE_SHARED``).  Skipped, with the reason, when this checkout's ``MVSM``
     has no ``hierarchy`` argument;
   - ``fp32_flat``: SGD over one mpi4py fp32 ``Allreduce`` of the flat gradient
     (``common.MpiSGD``, no momentum: what plain data parallelism sends);
   - ``fp32_hier``: SGD over a hierarchical fp32 allreduce in mpi4py: ``Reduce_scatter``
     inside the machine, ``Allreduce`` of the 1/k shard among the H ranks that hold it,
     ``Allgather`` inside the machine (what Horovod's ``NCCLHierarchicalAllreduce`` does on
     GPUs; see below).

2. Horovod (MPI mode) with ``HOROVOD_HIERARCHICAL_ALLREDUCE=1``: ``hvd_fp32_hier``, a
   ``DistributedOptimizer`` fp32 step.
3. Horovod without it: ``hvd_fp32_flat`` (``--no-hvd-flat`` skips it).  Horovod 0.28 has a
   hierarchical allreduce only for GPU tensors (``NCCLHierarchicalAllreduce``, built with
   NCCL); on CPU tensors the variable changes nothing and the step is ``MPI_Allreduce``
   over all ranks (``MPIAllreduce``), which jobs 2 and 3 show by their bytes.

Every method steps the same 16 ResNet-50-shaped tensors (common.BLOCK_SHAPES,
25,640,960 fp32 parameters at ``--scale 1``) with fixed random gradients (restored before
each step, untimed); no forward or backward pass is timed (it would cost every method the
same).  A step is timed from a barrier to the end of ``step()``; its time is the slowest
rank's; a record keeps the median over ``--reps`` steps after ``--warmup``.

Bytes crossing machines, per step: the ground truth is the shaper of each machine's link
(``tc -s qdisc`` on its ``eth0``, the machine's only way out), read by its ranks inside
the namespace around every step (``cluster.qdisc_bytes``; the device's own
``/sys/class/net/eth0`` counter is kept beside it), and printed per job next to the same
counters read by the driver around the whole job.  Per rank = the busiest machine's
bytes sent / k.  signcomm's byte ledger gives the MVSM rows' own count (``opt.stats``:
``bytes_sent``, and the hierarchical engine's split by level where it reports one).
Records: ``--out`` (JSON); a table on stdout.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks/

ROOT = HERE.parent.parent
MPI_METHODS = ("mvsm_flat", "mvsm_hier", "fp32_flat", "fp32_hier")
HVD_METHODS = ("hvd_fp32_hier", "hvd_fp32_flat")
THROTTLE = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
            "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1"}
LABELS = {
    "mvsm_flat": "(a) MVSM v1 sharded, flat",
    "mvsm_hier": "(b) MVSM v1 sharded, hierarchy='host'",
    "fp32_flat": "(c) fp32 allreduce, flat (mpi4py)",
    "fp32_hier": "    fp32 allreduce, hierarchical (mpi4py RS/AR/AG)",
    "hvd_fp32_hier": "(d) Horovod fp32, HOROVOD_HIERARCHICAL_ALLREDUCE=1",
    "hvd_fp32_flat": "    Horovod fp32, HOROVOD_HIERARCHICAL_ALLREDUCE=0",
}


# ------------------------------------------------------------------------------ ranks
def mvsm_hierarchy_support():
    """None when ``signcomm.MVSM`` accepts ``hierarchy=``, else why not."""
    from signcomm import MVSM
    if "hierarchy" not in inspect.signature(MVSM.__init__).parameters:
        return ("signcomm.MVSM has no `hierarchy` argument in this checkout (the "
                "hierarchical engine has not landed)")
    return None


class HierFP32:
    """SGD over a two-level fp32 allreduce: reduce-scatter inside the machine (``local``),
    allreduce of this rank's 1/k shard with the ranks holding it on the other machines
    (``cross``), allgather inside the machine; then the mean gradient and an SGD step."""

    def __init__(self, local, cross, params, lr=1e-4):
        import torch
        self.local, self.cross, self.params = local, cross, list(params)
        self.k, self.n = local.Get_size(), local.Get_size() * cross.Get_size()
        self.opt = torch.optim.SGD(self.params, lr=lr)
        d = sum(p.numel() for p in self.params)
        self.d, self.s = d, -(-d // self.k)
        self.flat = torch.zeros(self.s * self.k)
        self.shard, self.summed = torch.zeros(self.s), torch.zeros(self.s * self.k)

    def step(self):
        import torch
        from mpi4py import MPI
        torch.cat([p.grad.reshape(-1) for p in self.params], out=self.flat[:self.d])
        self.local.Reduce_scatter_block(self.flat.numpy(), self.shard.numpy(), op=MPI.SUM)
        self.cross.Allreduce(MPI.IN_PLACE, self.shard.numpy(), op=MPI.SUM)
        self.local.Allgather(self.shard.numpy(), self.summed.numpy())
        self.summed.div_(self.n)
        off = 0
        for p in self.params:
            p.grad.copy_(self.summed[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.opt.step()


def ledger_breakdown(ledger):
    """The last step's calls by ledger kind and operation: ``<kind>:<op>:{calls,bytes,s}``
    (e.g. the fp32 alltoall inside the machine, kind 'local', against the vote's)."""
    out = {}
    for rec in ledger.records:
        key = f"{rec.kind}:{rec.op}"
        out[f"{key}:calls"] = out.get(f"{key}:calls", 0) + 1
        out[f"{key}:bytes"] = out.get(f"{key}:bytes", 0) + rec.bytes_sent
        out[f"{key}:s"] = out.get(f"{key}:s", 0.0) + rec.seconds
    return out


def make_params(scale, rank):
    import torch
    from common import BLOCK_SHAPES, scaled_shapes
    shapes = scaled_shapes(BLOCK_SHAPES, scale)
    gen = torch.Generator().manual_seed(1234 + rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return params, grads


def rank_main(a):
    from common import Method, interleave, pin_threads
    from cluster import qdisc_bytes
    from ddp_bench import nic_bytes
    engine = a.engine
    threads = pin_threads(int(os.environ.get("PMI_SIZE", "1")))   # all ranks share this box
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    if engine == "horovod":
        import horovod.torch as hvd
        hvd.init()
        rank, n, k = hvd.rank(), hvd.size(), hvd.local_size()

        def allgather(vec):
            return hvd.allgather(torch.tensor([vec], dtype=torch.float64),
                                 name="hb.gather").numpy()

        barrier = hvd.barrier
    else:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, n = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, 0)
        k = local.Get_size()
        cross = comm.Split(local.Get_rank(), rank)

        def allgather(vec):
            return np.array(comm.allgather(list(vec)), dtype=np.float64)

        barrier = comm.Barrier
    params, grads = make_params(a.scale, rank)
    d = sum(p.numel() for p in params)

    def restore():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    runs, skipped = [], {}
    for method in a.methods:
        stats_of = None
        if method in ("mvsm_flat", "mvsm_hier"):
            from signcomm import MVSM
            kw = {}
            if method == "mvsm_hier":
                why = mvsm_hierarchy_support()
                if why:
                    skipped[method] = why
                    continue
                kw["hierarchy"] = "host"
            opt = MVSM(params, lr=1e-4, variant="v1", schedule="sharded", transport="mpi",
                       **kw)
            stats_of = opt
        elif method == "fp32_flat":
            from common import MpiSGD
            opt = MpiSGD(comm, params, momentum=0.0)
        elif method == "fp32_hier":
            opt = HierFP32(local, cross, params)
        elif method.startswith("hvd_fp32"):
            from common import hvd_sgd
            opt = hvd_sgd(hvd, [(f"layer{i}.weight", p) for i, p in enumerate(params)])
        else:
            raise ValueError(f"unknown method {method!r}")
        run = dict(method=method, opt=opt, stats_of=stats_of, tx=[], rx=[], tc=[], stats=[])

        def before(i, run=run):
            restore()
            run["nic0"] = nic_bytes()
            run["tc0"] = qdisc_bytes("eth0")

        if engine == "horovod":
            def step(i, opt=opt):
                opt.synchronize()
                with opt.skip_synchronize():
                    opt.step()
        else:
            def step(i, opt=opt):
                opt.step()

        def after(i, run=run):
            tx, rx = nic_bytes()
            tc = qdisc_bytes("eth0")
            if i >= a.warmup:
                run["tx"].append(tx - run["nic0"][0])
                run["rx"].append(rx - run["nic0"][1])
                run["tc"].append(tc - run["tc0"])
                if run["stats_of"] is not None:
                    st = {key: v for key, v in run["stats_of"].stats.items()
                          if isinstance(v, (int, float))}
                    st.update(ledger_breakdown(run["stats_of"].transport.ledger))
                    run["stats"].append(st)

        run["m"] = Method(step, before=before, after=after, name=method)
        runs.append(run)

    def allmax(x):
        return float(allgather([x]).max())

    t0 = time.time()
    interleave([r["m"] for r in runs], a.reps, a.warmup, barrier=barrier, allmax=allmax,
               rotate=True)
    wall = time.time() - t0
    records = []
    for r in runs:
        # per machine: the bytes its link carried (every rank of it reads the same counter)
        tx = allgather([statistics.median(r["tc"]), statistics.median(r["rx"]),
                        sum(r["tc"]), sum(r["rx"]), statistics.median(r["tx"])])
        stats = {}
        if r["stats"]:
            keys = sorted(set.intersection(*(set(s) for s in r["stats"])))
            mine = [statistics.median(s[key] for s in r["stats"]) for key in keys]
            stats = dict(zip(keys, allgather(mine).max(axis=0).tolist()))
        machines_tx = [float(tx[m * k:(m + 1) * k, 0].max()) for m in range(n // k)]
        machines_rx = [float(tx[m * k:(m + 1) * k, 1].max()) for m in range(n // k)]
        records.append(dict(
            method=r["method"], label=LABELS[r["method"]], engine=engine, n=n, k=k,
            machines=n // k, d=d, gbit=a.gbit, reps=a.reps, warmup=a.warmup,
            seconds=statistics.median(r["m"].times), times=r["m"].times,
            machine_tx_bytes=machines_tx, machine_rx_bytes=machines_rx,
            machine_eth0_tx_bytes=[float(tx[m * k:(m + 1) * k, 4].max())
                                   for m in range(n // k)],
            machine_tx_bytes_timed_total=[float(tx[m * k:(m + 1) * k, 2].max())
                                          for m in range(n // k)],
            cross_bytes_per_rank=max(machines_tx) / k,
            stats=stats, job_seconds=wall,
            hvd_hierarchical_env=os.environ.get("HOROVOD_HIERARCHICAL_ALLREDUCE")))
    if rank == 0:
        with open(a.out, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            for method, why in skipped.items():
                f.write(json.dumps(dict(method=method, label=LABELS[method], skipped=why,
                                        n=n, k=k, d=d)) + "\n")
    if engine == "horovod":
        hvd.shutdown()
    return 0


# ------------------------------------------------------------------------------ driver
def ledger_cross(stats):
    """The hierarchical engine's own count of bytes sent between machines per step, if
    its stats name one (a key with 'inter' or 'cross' and 'bytes'), else None."""
    for key, v in sorted(stats.items()):
        if "bytes" in key and ("inter" in key or "cross" in key) and "recv" not in key \
                and "received" not in key:
            return key, v
    return None


def paired_speedup(base, r):
    """Median over repetitions of base's time / r's time in the same repetition (the
    methods of one job run in turns, so a repetition's pair saw the same load); NaN when
    the two come from different jobs."""
    if not base or base.get("engine") != r.get("engine") or \
            len(base["times"]) != len(r["times"]):
        return float("nan")
    return statistics.median(b / t for b, t in zip(base["times"], r["times"]))


def print_table(rows, gbit):
    base = next((r for r in rows if r["method"] == "mvsm_flat" and "seconds" in r), None)
    print(f"\n{'method':52s} {'step ms':>8} {'comm ms':>8} {'cpu ms':>7} "
          f"{'cross MB/rank':>13} {'floor ms':>8} "
          f"{'ledger MB/rank':>14} {'bytes/flat':>10} {'flat/step':>9} {'paired':>6}")
    print("(ledger: all bytes sent / those of the machines' vote, where the engine splits "
          "them; flat/step: ratio of medians; paired: median of the per-repetition ratios)")
    for r in rows:
        if "skipped" in r:
            print(f"{r['label']:52s} SKIPPED: {r['skipped']}")
            continue
        cross = r["cross_bytes_per_rank"]
        floor = 8 * cross * r["k"] / (gbit * 1e9) if gbit else float("nan")
        led = r["stats"].get("bytes_sent")
        lc = ledger_cross(r["stats"])
        led_s = (f"{led / 1e6:.2f}" if led is not None else "-") + \
            (f" / {lc[1] / 1e6:.2f}" if lc else "")
        ratio = cross / base["cross_bytes_per_rank"] if base else float("nan")
        speed = base["seconds"] / r["seconds"] if base else float("nan")
        paired = paired_speedup(base, r)
        st = r["stats"]
        cpu = sum(st.get(key, 0.0) for key in ("compress_s", "vote_s", "update_s"))
        comm = f"{1e3 * st['comm_s']:8.0f}" if "comm_s" in st else f"{'-':>8}"
        cpu = f"{1e3 * cpu:7.0f}" if "compress_s" in st else f"{'-':>7}"
        print(f"{r['label']:52s} {1e3 * r['seconds']:8.0f} {comm} {cpu} {cross / 1e6:13.2f} "
              f"{1e3 * floor:8.0f} {led_s:>14} {ratio:10.3f} {speed:9.2f} {paired:6.2f}")


def checkout_commit():
    """HEAD of this checkout, with '+dirty' when signcomm/ has uncommitted changes (the
    engine measured may differ from the commit), or None outside git."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "signcomm"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=4, help="H (default 4)")
    ap.add_argument("--ranks-per-machine", type=int, default=2, help="k (default 2)")
    ap.add_argument("--gbit", type=float, default=1.0, help="link between machines, Gbit/s")
    ap.add_argument("--methods", nargs="+", default=list(MPI_METHODS) + list(HVD_METHODS),
                    choices=MPI_METHODS + HVD_METHODS)
    ap.add_argument("--no-hvd-flat", action="store_true",
                    help="skip job 3 (Horovod without HOROVOD_HIERARCHICAL_ALLREDUCE)")
    ap.add_argument("--throttle", action="store_true",
                    help="MPICH waits sleep after every idle poll instead of spinning "
                         "(MPIR_CVAR_CH4_PROGRESS_THROTTLE*, as scripts/compare.py): fewer "
                         "cycles lost when the ranks outnumber the cores")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale the parameter set (1.0 = 25.6M; smaller for a smoke run)")
    ap.add_argument("--job-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "netem_hier.json"))
    ap.add_argument("--report", action="store_true", help="print the table of --out and exit")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="mpi", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank_main:
        return rank_main(a)
    if a.report:
        rows = json.loads(Path(a.out).read_text())
        print_table(rows, rows[0].get("gbit", a.gbit) if rows else a.gbit)
        return 0

    import cluster as netem
    why = netem.namespace_support()
    if why:
        print(f"hier_bench.py: cannot build the emulated cluster here: {why}", file=sys.stderr)
        return 77
    netem._raise_on_signals()
    python = netem.venv_python()
    jobs = [("mpi", [m for m in a.methods if m in MPI_METHODS], {})]
    if "hvd_fp32_hier" in a.methods:
        jobs.append(("horovod", ["hvd_fp32_hier"], {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1"}))
    if "hvd_fp32_flat" in a.methods and not a.no_hvd_flat:
        jobs.append(("horovod", ["hvd_fp32_flat"], {"HOROVOD_HIERARCHICAL_ALLREDUCE": "0"}))
    if a.throttle:
        for _, _, env in jobs:
            env.update(THROTTLE)
    rows, t_start = [], time.time()
    commit = checkout_commit()
    with netem.Cluster(a.machines, a.gbit, ranks_per_machine=a.ranks_per_machine) as c:
        print(f"hier_bench.py: cluster {c.prefix}: {c.n} machines x {c.k} ranks, "
              f"{a.gbit:g} Gbit/s between machines", flush=True)
        for engine, methods, env in jobs:
            if not methods:
                continue
            part = Path(c.hostfile).parent / f"rows-{engine}-{methods[0]}.jsonl"
            cmd = [python, "-m", "mpi4py", str(Path(__file__).resolve()), "--rank-main",
                   "--engine", engine, "--out", str(part), "--reps", str(a.reps),
                   "--warmup", str(a.warmup), "--scale", str(a.scale), "--gbit", str(a.gbit),
                   "--machines", str(a.machines), "--methods", *methods]
            load = os.getloadavg()
            before = c.link_bytes()
            t0 = time.time()
            rc, text = c.run(cmd, timeout=a.job_timeout, env=env)
            wall = time.time() - t0
            after = c.link_bytes()
            print(text[-3000:], end="", flush=True)
            if rc != 0 or not part.exists():
                print(f"hier_bench.py: job {engine} {methods} failed (rc={rc})", flush=True)
                continue
            tc_tx = [after[m]["tx"] - before[m]["tx"] for m in range(c.n)]
            timed = [0.0] * c.n
            for line in part.read_text().splitlines():
                rec = json.loads(line)
                rec.update(loadavg_before=load, job_wall_seconds=wall, job_tc_tx_bytes=tc_tx,
                           job_env=env, commit=commit)
                for m, b in enumerate(rec.get("machine_tx_bytes_timed_total", [])):
                    timed[m] += b
                rows.append(rec)
            # Ground truth: the namespaces' counters over the timed steps of all the job's
            # methods are the tc counters of the same links minus start-up, warm-up and
            # barriers; print both so a reader can see the share they explain.
            print(f"hier_bench.py: job {engine} {methods}: machine links (tc) sent "
                  f"{[round(b / 1e6, 1) for b in tc_tx]} MB, of which in the timed steps "
                  f"{[round(b / 1e6, 1) for b in timed]} MB", flush=True)
            for rec in rows:
                if rec.get("job_tc_tx_bytes") is tc_tx:
                    rec["job_timed_tx_bytes"] = timed
    for r in rows:
        print(("SKIPPED " if "skipped" in r else "RECORD ") + json.dumps(r))
    print_table(rows, a.gbit)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"\nhier_bench.py: {len(rows)} rows in {time.time() - t_start:.0f} s -> {a.out}; "
          f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
