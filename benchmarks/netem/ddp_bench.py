#!/usr/bin/env python3
"""DDP training steps over torch.distributed (gloo/TCP) in the emulated cluster: signcomm's
hook against DDP's own allreduce, PyTorch's fp16_compress_hook and PowerSGD, in one run.

    sudo .venv/bin/python benchmarks/netem/ddp_bench.py                  # n = 4 and 8, 1 Gbit/s
    sudo .venv/bin/python benchmarks/netem/ddp_bench.py --n 2 --d 1e6    # quick look

For each n, one cluster of n namespaces (cluster.py) and one job: every rank joins a gloo
process group over its rate-limited ``eth0`` (``GLOO_SOCKET_IFNAME=eth0``, the TCP store
on rank 0's address) and runs, on the same model (the 4-layer MLP of netem_bench.py's
step methods, about d parameters, batch 16 per rank, MSE loss):

- ``local``: forward, backward and SGD without any communication (the compute floor);
- ``ddp_fp32``: DDP's default (fp32 allreduce of 25 MB buckets), SGD with momentum;
- ``ddp_fp16``: DDP + ``fp16_compress_hook``, SGD with momentum;
- ``ddp_powersgd``: DDP + ``powerSGD_hook`` (rank 4, compressing from the third step), SGD
  with momentum, the model in one DDP bucket (PowerSGD's callbacks post allreduces from
  gloo's threads in completion order: with several buckets the ranks' orders differ, which
  gloo reports as a collective mismatch or hangs on);
- ``ddp_signcomm``: DDP + ``signcomm.ddp`` (mvsm-v1, sharded schedule) + SGD(lr);
- ``raw_sharded``: the sharded schedule's two collectives alone through
  ``TorchDistTransport`` (alltoall of d/8 bytes, allgather of d/(8n) bytes per rank), no
  model: what the transport and the links give without any compute around them.

A step is timed from a barrier to the end of ``optimizer.step()`` on every rank; its time is
the slowest rank's; a record keeps the median of ``--steps`` steps after ``--warmup``.  Bytes
per rank and step: the hook's ledger for signcomm (control traffic included), the
ring-allreduce bytes of what DDP / the fp16 hook allreduce, PowerSGD's own count of the
elements it allreduces (P, Q, uncompressed tensors), and the bytes that crossed each
rank's ``eth0`` (``wire_*``, headers included; the busiest rank).  ``floor_seconds`` is the
payload bytes over the link rate.  Records: ``<out>/netem_ddp.jsonl`` (default
benchmarks/netem/); a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
METHODS = ("local", "ddp_fp32", "ddp_fp16", "ddp_powersgd", "ddp_signcomm", "raw_sharded")
PORT = 29517


# ------------------------------------------------------------------------------ worker
def nic_bytes(dev="eth0"):
    """(tx, rx) bytes of this namespace's ``dev`` so far (0, 0 if it has none)."""
    base = Path(f"/sys/class/net/{dev}/statistics")
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except OSError:
        return 0, 0


def worker(a):
    rank, n = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    threads = max(1, (os.cpu_count() or 1) // n)
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import signcomm.ddp
    from common import mlp
    from signcomm.comm import ring_allreduce_bytes

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{PORT}", rank=rank,
                            world_size=n)
    aux = dist.new_group(backend="gloo")   # barriers and timings, never the methods' group
    w = max(8, int(round(math.sqrt(a.d / 4))))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, w, generator=g), torch.randn(16, w, generator=g)
    records = []
    for method in a.methods:
        model = mlp(w, 4, seed=0)
        d = sum(p.numel() for p in model.parameters())
        state = psgd = None
        if method == "raw_sharded":
            from signcomm.comm.torchdist import TorchDistTransport
            transport = TorchDistTransport()
            s = -(-(-(-d // 8)) // n)
            rows = torch.randint(0, 255, (n, s), dtype=torch.uint8, generator=g)
            shard = torch.randint(0, 255, (s,), dtype=torch.uint8, generator=g)

            class Raw:
                def __call__(self, _x):
                    transport.start_alltoall(rows, channel=1).wait()
                    transport.start_allgather(shard, channel=2).wait()
                    return torch.zeros((), requires_grad=True)

                def zero_grad(self):
                    pass

                def step(self):
                    pass

            net = opt = Raw()
        elif method == "local":
            net, opt = model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        else:
            # PowerSGD on gloo: one bucket (its callbacks post allreduces in completion
            # order, which differs across ranks with several buckets: mismatch or hang)
            net = DDP(model, **({"bucket_cap_mb": 4 * d / 2 ** 20 + 1}
                                if method == "ddp_powersgd" else {}))
            if method == "ddp_signcomm":
                state = signcomm.ddp.register(net, "mvsm-v1", schedule="sharded")
                opt = torch.optim.SGD(net.parameters(), lr=1e-4)
            else:
                opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
                if method == "ddp_fp16":
                    net.register_comm_hook(None, default_hooks.fp16_compress_hook)
                elif method == "ddp_powersgd":
                    psgd = powerSGD_hook.PowerSGDState(process_group=None,
                                                       matrix_approximation_rank=4,
                                                       start_powerSGD_iter=2)
                    net.register_comm_hook(psgd, powerSGD_hook.powerSGD_hook)
        times, comm, sent, parts = [], [], [], []
        seen = 0
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                nic0 = nic_bytes()
            dist.barrier(group=aux)
            t0 = time.perf_counter()
            opt.zero_grad()
            out = net(x)
            if method != "raw_sharded":
                torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=aux)
            if method == "ddp_signcomm":
                step_bytes, c = state.stats["bytes_sent"], state.stats["comm_s"]
                parts.append([state.stats["compress_s"], state.stats["vote_s"],
                              state.stats["hook_s"]])
            elif method == "ddp_powersgd":
                after = int(psgd.total_numel_after_compression)
                moved, seen = after - seen, after
                step_bytes, c = ring_allreduce_bytes(4 * (moved or d), n), None
            elif method == "ddp_fp16":
                step_bytes, c = ring_allreduce_bytes(2 * d, n), None
            elif method == "ddp_fp32":
                step_bytes, c = ring_allreduce_bytes(4 * d, n), None
            elif method == "raw_sharded":
                step_bytes, c = 2 * (n - 1) * s, float(t)
            else:
                step_bytes, c = 0, None
            if i >= a.warmup:
                times.append(float(t))
                sent.append(step_bytes)
                if c is not None:
                    comm.append(c)
        nic1 = nic_bytes()
        wire = torch.tensor([(nic1[0] - nic0[0]) / a.steps, (nic1[1] - nic0[1]) / a.steps,
                             max(sent)], dtype=torch.float64)
        if comm:
            wire = torch.cat([wire, torch.tensor([statistics.median(comm)], dtype=torch.float64)])
        if parts:  # the hook's own work: median over steps, max over ranks
            wire = torch.cat([wire, torch.tensor([statistics.median(p[k] for p in parts)
                                                  for k in range(3)], dtype=torch.float64)])
        dist.all_reduce(wire, op=dist.ReduceOp.MAX, group=aux)
        rec = dict(method=method, n=n, d=d, model=f"MLP 4x{w}", batch=16,
                   gbit_per_s=a.gbit, steps=a.steps, warmup=a.warmup,
                   seconds=statistics.median(times), all_seconds=times,
                   bytes_sent_per_rank=int(wire[2]), wire_tx_bytes=int(wire[0]),
                   wire_rx_bytes=int(wire[1]),
                   floor_seconds=(8 * float(wire[2]) / (a.gbit * 1e9)) if a.gbit else None,
                   comm_seconds=float(wire[3]) if comm else None)
        if parts:
            rec.update(hook_compress_seconds=float(wire[4]), hook_vote_seconds=float(wire[5]),
                       hook_seconds=float(wire[6]))
        if rank == 0:
            print("RECORD " + json.dumps(rec), flush=True)
        records.append(rec)
        del net, opt, state, psgd, model
        dist.barrier(group=aux)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ driver
def table(records):
    ns = sorted({r["n"] for r in records})
    lines = ["| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---" * (1 + len(ns)) + "|"]
    by = {(r["method"], r["n"]): r for r in records}
    for m in METHODS:
        if not any((m, n) in by for n in ns):
            continue
        cells = []
        for n in ns:
            r = by.get((m, n))
            if r is None:
                cells.append("-")
                continue
            fp32 = by.get(("ddp_fp32", n))
            speed = (f" / {fp32['seconds'] / r['seconds']:.2f}x"
                     if fp32 and m not in ("local", "raw_sharded") else "")
            comm = (f" (comm {1e3 * r['comm_seconds']:.0f})"
                    if r.get("comm_seconds") and m != "raw_sharded" else "")
            floor = f" / floor {1e3 * r['floor_seconds']:.0f}" if r.get("floor_seconds") else ""
            cells.append(f"{1e3 * r['seconds']:.0f}{comm}{floor}{speed}; "
                         f"{r['bytes_sent_per_rank'] / 1e6:.1f} MB, wire "
                         f"{r['wire_tx_bytes'] / 1e6:.1f} MB")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--gbit", type=float, default=1.0)
    ap.add_argument("--d", type=float, default=25.6e6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--report", action="store_true",
                    help="print the table of <out>/netem_ddp.jsonl and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master", default="10.77.0.1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.report:
        print(report(Path(a.out) / "netem_ddp.jsonl"))
        return 0
    sys.path.insert(0, str(HERE))
    import cluster as netem
    netem._raise_on_signals()   # SIGINT/SIGTERM/SIGHUP -> exceptions: teardown runs
    records = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in a.n:
        t0 = time.time()
        with netem.Cluster(n, a.gbit) as c:
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker",
                    "--gbit", a.gbit, "--d", a.d, "--steps", a.steps, "--warmup", a.warmup,
                    "--methods", *a.methods]
            rc, text = c.run(argv, timeout=a.timeout, env={"PYTHONPATH": str(ROOT)})
        got = [json.loads(line.split("RECORD ", 1)[1]) for line in text.splitlines()
               if "RECORD " in line]
        load = os.getloadavg()[0]
        for r in got:
            r["load_avg"] = load
        records += got
        print(f"n={n}: {len(got)} records in {time.time() - t0:.0f} s (rc {rc}, load {load:.1f})",
              flush=True)
        if rc != 0:
            print(text[-4000:], file=sys.stderr)
        with open(out / "netem_ddp.jsonl", "a") as f:
            for r in got:
                f.write(json.dumps(r) + "\n")
    print(table(records))
    return 0


def report(path):
    """The table of the records in ``path`` (a netem_ddp.jsonl), the last of each kind."""
    recs = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        recs[(r["method"], r["n"], r["d"], r["gbit_per_s"])] = r
    return table(list(recs.values()))


if __name__ == "__main__":
    sys.exit(main())
