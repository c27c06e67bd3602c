"""Time per step of fp32 allreduce and of the one-bit vote schedules, rank side.

Run on n ranks, normally inside the emulated cluster (benchmarks/netem/run_bench.py does
that for every n and bandwidth)::

    python -m mpi4py benchmarks/netem_bench.py --gbit 1 --d 11.7e6 25.6e6 --out rec.jsonl
    python -m mpi4py benchmarks/netem_bench.py --engine horovod ...      # Horovod methods

Every method is timed the same way: all ranks meet at a barrier, run one step, and the
step's time is the slowest rank's; the record keeps the median (and min) of ``--reps``
steps after ``--warmup`` unrecorded ones.  Each record also carries the wire-time floor
(``floor_bytes``: payload bytes on the busiest rank link in one direction, for the
bandwidth-optimal algorithm; ``floor_seconds = floor_bytes * 8 / rate``) and, when run in a
namespace, the bytes that really crossed the busiest link (``wire_bytes``, from the NIC's
counters, so including TCP/IP/Ethernet headers and MPI's own algorithm choice).

Methods (engine "mpi" unless marked):

- ``fp32_allreduce``: mpi4py ``Allreduce`` (SUM) of d float32.
- ``raw_allgather``: ``Allgather`` of ceil(d/8) bytes (the allgather schedule's traffic).
- ``raw_sharded``: ``Alltoall`` of ceil(d/8) bytes then ``Allgather`` of ceil(d/8/n)
  (the sharded schedule's traffic).
- ``raw_count_allreduce``: ``Allreduce`` SUM of the int64 words holding
  b = ceil(log2(n+1))-bit count fields, 63 // b per word.
- ``vote_<schedule>_<v1|v2>``: ``signcomm.vote.make_schedule(...).vote(packed, d, step)``,
  the real schedule: communication plus the popcount vote / count packing.
  ``comm_seconds`` is the time spent inside its collectives (the transport's ledger).
- ``signvote_<schedule>_v2``: float32 momentum -> shared R (one MAX allreduce) -> S_R pack
  -> vote -> unpack and ``x -= eta * o``: the whole sign path of one MVSM bucket, without
  the model's forward/backward.
- ``hvd_fp32_allreduce`` / ``hvd_fp16_allreduce`` (engine "horovod"): ``hvd.allreduce``
  of a d-float32 torch tensor, without / with ``hvd.Compression.fp16``.
- ``hvd_sign`` / ``hvd_s1`` (engine "horovod"): the project's Horovod compressors
  (``compressors.Compression.sign``/``.s1``: count fields on a float64 wire) through
  ``hvd.allreduce(x, compression=...)``, next to fp32 and fp16; a ``"skipped"`` record
  (with the error) if ``compressors`` fails to import.
- ``mvsm_step`` / ``mvsm_step_overlap`` / ``sgd_step``: a full training step (forward,
  backward, communication, update) of a 4-layer MLP with about d parameters, batch 16:
  ``signcomm.MVSM`` (sharded vote, v2, shared R) without / with overlap, and SGD with
  momentum over one mpi4py fp32 Allreduce of the flat gradient; ``hvd_sgd_step``
  (engine "horovod"): the same SGD through ``hvd.DistributedOptimizer``.
- ``latency_8B``: 20 ping-pongs of 8 bytes between ranks 0 and 1 (``half_rtt_seconds``).

Schedule and variant names are the library's; byte formulas, the fp32 and SGD baselines
and the model come from ``benchmarks/common.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import time

import numpy as np

from common import (MpiSGD, clock, count_field_words, fp32_allreduce_bytes, hvd_allreduce, hvd_sgd,
                    mlp, mpi_fp32_allreduce, random_packed, ring_allreduce_bytes, threads_per_rank,
                    vote_vocabulary)


def nic_counters():
    """(tx, rx) bytes of this namespace's eth0, or None outside the emulated cluster."""
    base = "/sys/class/net/eth0/statistics/"
    try:
        with open(base + "tx_bytes") as f:
            tx = int(f.read())
        with open(base + "rx_bytes") as f:
            rx = int(f.read())
        return tx, rx
    except OSError:
        return None


class Bench:
    def __init__(self, args, comm, barrier, allmax):
        self.a = args
        self.comm = comm
        self.barrier = barrier
        self.allmax = allmax          # float -> max over ranks
        self.rank = comm.Get_rank()
        self.n = comm.Get_size()
        self.records = []

    def measure(self, method, d, step_fn, floor_bytes, *, comm_seconds_fn=None, extra=None):
        """Warm up, then time ``reps`` steps; one record (rank 0 keeps it)."""
        times, comm_times, wire = [], [], []
        deadline = time.monotonic() + self.a.method_budget
        total = self.a.warmup + self.a.reps
        for i in range(total):
            self.barrier()
            c0 = nic_counters()
            dt = clock(step_fn, i)
            c1 = nic_counters()
            ct = comm_seconds_fn() if comm_seconds_fn else dt
            busiest = max(c1[0] - c0[0], c1[1] - c0[1]) if c0 and c1 else -1.0
            dt, ct, busiest = self.allmax([dt, ct, float(busiest)])
            if i >= self.a.warmup:
                times.append(dt)
                comm_times.append(ct)
                wire.append(busiest)
            # stop early (never before 2 timed reps) if a method eats its time budget;
            # the decision is rank 0's, broadcast, so every rank leaves together.
            stop = self.comm.bcast(i >= self.a.warmup + 1 and time.monotonic() > deadline, root=0)
            if stop:
                break
        rate = self.a.gbit * 1e9 / 8 if self.a.gbit else None
        rec = {
            "method": method, "engine": self.a.engine, "n": self.n, "d": int(d),
            "gbit_per_s": self.a.gbit, "seconds": statistics.median(times),
            "seconds_min": min(times), "comm_seconds": statistics.median(comm_times),
            "reps": len(times), "all_seconds": times,
            "floor_bytes": int(floor_bytes),
            "floor_seconds": floor_bytes / rate if rate else None,
            "wire_bytes": statistics.median(wire) if wire and wire[0] >= 0 else None,
            "host": socket.gethostname(), "cpus": os.cpu_count(),
        }
        rec.update(extra or {})
        if self.rank == 0:
            print(f"  {method:26s} n={self.n} d={d/1e6:5.1f}M  {rec['seconds']*1e3:9.1f} ms"
                  f"  (comm {rec['comm_seconds']*1e3:8.1f} ms, floor "
                  + (f"{rec['floor_seconds']*1e3:8.1f} ms" if rate else "   n/a") + ")", flush=True)
        self.records.append(rec)
        return rec

    def skipped(self, method, d, why):
        rec = {"method": method, "engine": self.a.engine, "n": self.n, "d": int(d),
               "gbit_per_s": self.a.gbit, "seconds": None, "floor_seconds": None,
               "skipped": why}
        if self.rank == 0:
            print(f"  {method:26s} skipped: {why}", flush=True)
        self.records.append(rec)


def wants(args, method):
    return not args.methods or any(method.startswith(m) for m in args.methods)


def run_mpi(b, d):
    from mpi4py import MPI
    from signcomm import kernels as K
    from signcomm.comm import MPITransport
    from signcomm.vote import SignVote, make_schedule

    comm, n, a = b.comm, b.n, b.a
    rng = np.random.default_rng(1234 + b.rank)
    nbytes = -(-d // 8)

    if wants(a, "latency") and n > 1 and d == int(a.d[0]):
        small, ack = np.zeros(1, np.float64), np.zeros(1, np.float64)

        def pingpong(i, k=20):
            for _ in range(k):
                if b.rank == 0:
                    comm.Send(small, dest=1, tag=3)
                    comm.Recv(ack, source=1, tag=4)
                elif b.rank == 1:
                    comm.Recv(small, source=0, tag=3)
                    comm.Send(ack, dest=0, tag=4)
        rec = b.measure("latency_8B", 0, pingpong, 0, extra={"note": "20 round trips rank 0 <-> 1"})
        rec["half_rtt_seconds"] = rec["seconds"] / 40

    if wants(a, "fp32_allreduce"):
        x = rng.standard_normal(d, dtype=np.float32)
        b.measure("fp32_allreduce", d, mpi_fp32_allreduce(comm, x), fp32_allreduce_bytes(d, n))
        del x

    packed = random_packed(d, rng)
    if wants(a, "raw_allgather"):
        out = np.empty((n, nbytes), np.uint8)
        b.measure("raw_allgather", d, lambda i: comm.Allgather(packed, out), (n - 1) * nbytes)
        del out
    if wants(a, "raw_sharded"):
        s = -(-nbytes // n)
        send = np.zeros((n, s), np.uint8)
        send.reshape(-1)[:nbytes] = packed
        recv = np.empty((n, s), np.uint8)
        mine = np.empty(s, np.uint8)
        gath = np.empty((n, s), np.uint8)

        def sharded(i):
            comm.Alltoall(send, recv)
            comm.Allgather(mine, gath)
        b.measure("raw_sharded", d, sharded, 2 * (n - 1) * s)
        del send, recv, gath
    if wants(a, "raw_count_allreduce"):
        w = count_field_words(d, n)
        words = np.zeros(w, np.int64)  # values do not change the timing
        words_out = np.empty_like(words)
        b.measure("raw_count_allreduce", d, lambda i: comm.Allreduce(words, words_out, op=MPI.SUM),
                  ring_allreduce_bytes(8 * w, n), extra={"count_field_bits": math.ceil(math.log2(n + 1)),
                                                         "words": w})
        del words, words_out

    # The signcomm collectives get their own communicator, so nothing they leave running
    # (an overlap worker) can pair with this script's own barriers and reductions.
    transport = MPITransport(comm.Dup())
    schedules, variants, _ = vote_vocabulary()
    for sched_name in schedules:
        for variant in variants:
            method = f"vote_{sched_name}_{variant}"
            if not wants(a, method):
                continue
            sched = make_schedule(sched_name, transport, variant=variant, seed=0)

            def step(i, sched=sched, method=method):
                transport.ledger.begin_step((method, d, i))  # a fresh ledger step per rep
                sched.vote(packed, d, i)

            def comm_s():
                return transport.ledger.summary().seconds
            b.measure(method, d, step, sched.predicted_bytes(d), comm_seconds_fn=comm_s,
                      extra={"schedule": sched_name, "variant": variant})

    for sched_name in schedules:
        method = f"signvote_{sched_name}_v2"
        if not wants(a, method):
            continue
        v = rng.standard_normal(d, dtype=np.float32)
        x = np.zeros(d, np.float32)
        sv = SignVote(transport, schedule=sched_name, variant="v2", seed=0, R="global")

        def step(i, sv=sv, v=v, x=x, method=method):
            transport.ledger.begin_step((method, d, i))
            vote = sv(v, i)
            x -= np.float32(1e-3) * K.unpack_signs(vote.bits, d)

        b.measure(method, d, step, sv.schedule.predicted_bytes(d),
                  comm_seconds_fn=lambda: transport.ledger.summary().seconds,
                  extra={"schedule": sched_name, "variant": "v2", "R": "global"})
        del v, x

    if wants(a, "mvsm_step") or wants(a, "sgd_step"):
        run_steps(b, d, transport)


def mlp_of(d, seed=0):
    """An MLP of 4 square layers with about d parameters (the model of the step methods),
    and its width."""
    w = max(8, int(round(math.sqrt(d / 4))))
    return mlp(w, 4, seed=seed), w


def run_steps(b, d, transport):
    """Full training steps (forward, backward, communication, update) on the same MLP:
    MVSM (sharded vote, v2, shared R) without and with overlap, and SGD with momentum
    whose gradients are averaged by one mpi4py fp32 Allreduce of the flat gradient."""
    import torch
    import signcomm

    a, n, comm = b.a, b.n, b.comm
    torch.set_num_threads(threads_per_rank(n))
    batch = 16

    def fresh():
        # A fresh model per method: MVSM(overlap=True) leaves gradient hooks on the
        # parameters it was given, which would fire (and communicate) in a later method.
        model, w = mlp_of(d)
        g = torch.Generator().manual_seed(b.rank)
        x, y = torch.randn(batch, w, generator=g), torch.randn(batch, w, generator=g)

        def fwd_bwd():
            for p in model.parameters():
                p.grad = None
            torch.nn.functional.mse_loss(model(x), y).backward()
        return model, w, fwd_bwd

    model, w, _ = fresh()
    dm = sum(p.numel() for p in model.parameters())
    del model
    extra = {"model": f"MLP 4x{w}", "model_params": dm, "batch": batch}
    sharded = make_schedule_bytes(transport, "sharded", dm)
    for overlap in (False, True):
        method = "mvsm_step_overlap" if overlap else "mvsm_step"
        if not wants(a, method):
            continue
        model, _, fwd_bwd = fresh()
        opt = signcomm.MVSM(model.parameters(), lr=1e-4, beta=0.5, variant="v2",
                            schedule="sharded", transport=transport, overlap=overlap)
        stats = {}

        def step(i, opt=opt, stats=stats, fwd_bwd=fwd_bwd):
            fwd_bwd()
            opt.step()
            stats.update(opt.stats)

        b.measure(method, d, step, sharded, comm_seconds_fn=lambda s=stats: s.get("comm_s", 0.0),
                  extra=dict(extra, schedule="sharded", variant="v2", overlap=overlap))
        del opt, model
    if wants(a, "sgd_step"):
        model, _, fwd_bwd = fresh()
        sgd = MpiSGD(comm, model.parameters(), lr=1e-4, momentum=0.9)

        def step(i):
            fwd_bwd()
            sgd.step()

        b.measure("sgd_step", d, step, fp32_allreduce_bytes(dm, n),
                  comm_seconds_fn=lambda: sgd.comm_seconds,
                  extra=dict(extra, optimizer="SGD momentum 0.9, fp32 mpi4py Allreduce"))


def make_schedule_bytes(transport, name, d):
    from signcomm.vote import make_schedule
    return make_schedule(name, transport).predicted_bytes(d)


def run_horovod(b, d):
    import torch
    import horovod.torch as hvd

    n, a = b.n, b.a
    torch.manual_seed(b.rank)
    x = torch.randn(d, dtype=torch.float32)
    if wants(a, "hvd_fp32_allreduce"):
        b.measure("hvd_fp32_allreduce", d, hvd_allreduce(hvd, x, "fp32"), fp32_allreduce_bytes(d, n))
    if wants(a, "hvd_fp16_allreduce"):
        b.measure("hvd_fp16_allreduce", d,
                  hvd_allreduce(hvd, x, "fp16", compression=hvd.Compression.fp16),
                  fp32_allreduce_bytes(d, n, itemsize=2))
    if wants(a, "hvd_compressors"):
        try:
            import compressors  # the project's Horovod compressors
            from compressors.wire import message_words
        except ImportError as exc:
            b.skipped("hvd_compressors", d, f"compressors does not import: {exc}")
            compressors = None
        for m in ("sign", "s1") if compressors is not None else ():
            comp = getattr(compressors.Compression, m)
            words = message_words(d, n, "float64")
            b.measure(f"hvd_{m}", d, hvd_allreduce(hvd, x, m, compression=comp),
                      ring_allreduce_bytes(8 * words, n),
                      extra={"wire": "float64 count fields", "words": words})
    if wants(a, "hvd_sgd_step"):
        model, w = mlp_of(d)
        dm = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(b.rank)
        xb, yb = torch.randn(16, w, generator=g), torch.randn(16, w, generator=g)
        opt = hvd_sgd(hvd, model.named_parameters(), lr=1e-4, momentum=0.9)

        def step(i):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()

        b.measure("hvd_sgd_step", d, step, fp32_allreduce_bytes(dm, n),
                  extra={"model": f"MLP 4x{w}", "model_params": dm, "batch": 16,
                         "optimizer": "hvd.DistributedOptimizer(SGD momentum 0.9), fp32"})


def main():
    ap = argparse.ArgumentParser(description="time per step of fp32 allreduce vs one-bit votes")
    ap.add_argument("--gbit", type=float, default=None, help="link rate (for the floor); none = no floor")
    ap.add_argument("--d", type=float, nargs="+", default=[11.7e6, 25.6e6])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--method-budget", type=float, default=30.0,
                    help="seconds after which a method stops repeating (>= 2 timed reps)")
    ap.add_argument("--engine", choices=("mpi", "horovod"), default="mpi")
    ap.add_argument("--methods", nargs="*", default=None, help="prefixes of methods to run")
    ap.add_argument("--out", default=None, help="JSON-lines file; rank 0 appends one record per line")
    a = ap.parse_args()
    a.reps = max(1, min(a.reps, 50))
    a.warmup = max(0, min(a.warmup, 10))

    if a.engine == "horovod":
        import horovod.torch as hvd
        import torch
        hvd.init()
        torch.set_num_threads(threads_per_rank(hvd.size()))
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.Get_size() != hvd.size():
            raise SystemExit("Horovod and MPI disagree on the job size")

        def barrier():
            hvd.barrier()

        def allmax(vals):
            t = hvd.allreduce(torch.tensor(vals, dtype=torch.float64), op=hvd.Max, name="bench.max")
            return t.tolist()
    else:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD

        def barrier():
            comm.Barrier()

        def allmax(vals):
            out = np.empty(len(vals))
            comm.Allreduce(np.asarray(vals, dtype=np.float64), out, op=MPI.MAX)
            return out.tolist()

    b = Bench(a, comm, barrier, allmax)
    if b.rank == 0:
        print(f"netem_bench: engine={a.engine} n={b.n} gbit={a.gbit} d={[int(x) for x in a.d]}",
              flush=True)
    for d in a.d:
        d = int(d)
        (run_horovod if a.engine == "horovod" else run_mpi)(b, d)
        if b.rank == 0 and a.out:
            with open(a.out, "a") as f:
                for rec in b.records:
                    f.write(json.dumps(rec) + "\n")
        b.records = []
    if a.engine == "horovod":
        hvd.shutdown()


if __name__ == "__main__":
    main()
