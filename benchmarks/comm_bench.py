"""Communication benchmark: the one-bit vote schedules against an fp32 allreduce.

Run on N ranks (one process per rank)::

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 \\
        mpirun -np N python benchmarks/comm_bench.py [--json out.json] [--d 1M,11.7M,25.6M] [--repeat K]

For every d (default 1M, 11.7M = ResNet-18, 25.6M = ResNet-50) it measures, in one run:

- baselines: an fp32 SUM allreduce of d float32 through mpi4py (``comm.Allreduce``) and
  through Horovod (``hvd.allreduce``), and Horovod's fp16 compression
  (``hvd.allreduce(t, compression=hvd.Compression.fp16)``);
- every vote schedule (allgather, sharded, allreduce) x transport (mpi, and horovod when
  ``horovod.torch`` imports) x variant (v1, v2): ``schedule.vote(packed, d, step)``, from
  this rank's packed bits to the ``Vote`` on every rank (communication and the popcount
  vote / count packing included).

Timing: all ranks meet at an MPI barrier before each timed call; a call's time is the
slowest rank's; the record keeps the median over ``--repeat`` repeats (after
``--warmup`` unrecorded ones, which also load the numba kernels).  The methods of one d
and transport are interleaved (repeat i runs each of them once), so that a swing in the
load of a shared machine hits them alike.  Bytes sent and
received per rank come from the transport's ledger (the bytes a bandwidth-optimal
algorithm moves for this rank, see ``signcomm/comm/ledger.py``); the fp32 baseline's are
a ring allreduce's, ``2 (n-1)/n * 4d``, and fp16's ``2 (n-1)/n * 2d``
(``signcomm.comm.ring_allreduce_bytes``).  The timing loop, byte formulas and baselines
are ``benchmarks/common.py``'s; schedule, variant and tie names are the library's.

All MPI measurements run before ``hvd.init()``: Horovod's background thread wakes every
cycle to coordinate, which on a few shared cores would slow the mpi4py numbers down.

Rank 0 prints one table per d, the target checks as PASS/FAIL lines, and writes the
records to ``--json``.  ``--report FILE...`` (no MPI job needed) renders saved JSON files
as Markdown tables, which is how docs/comm_bench.md was made.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

from common import (ROOT, Method, fp32_allreduce_bytes, hvd_allreduce, interleave,
                    mpi_fp32_allreduce, pin_threads, random_packed, threads_per_rank,
                    vote_vocabulary)

T0 = time.perf_counter()
NAMES = {1_000_000: "1M", 11_700_000: "ResNet-18", 25_600_000: "ResNet-50"}
#: Targets: bytes per rank at most 1/25 of the fp32 allreduce's; the sharded schedule for
#: every n, the allgather schedule for n <= 8.
TARGET_RATIO = 1 / 25
TARGETS = {"sharded": None, "allgather": 8}  # schedule -> largest n the target covers


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '11.7M', '25.6e6', '4k', '1000' -> ints."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1M, 11.7M, 4k, 1000)")
    scale = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}[m.group(2).lower()]
    value = round(float(m.group(1)) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1, got {text!r}")
    return value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the records here (rank 0)")
    ap.add_argument("--d", default="1M,11.7M,25.6M",
                    help="comma-separated coordinate counts (default 1M,11.7M,25.6M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    ap.add_argument("--transports", default="mpi,horovod",
                    help="comma-separated; horovod is skipped (with a note) when it does not import")
    ap.add_argument("--schedules", default=None,
                    help="comma-separated signcomm.vote.SCHEDULES names (default all)")
    ap.add_argument("--variants", default=None, help="comma-separated (default v1,v2)")
    ap.add_argument("--tie", default="coin", help="the v1 tie rule (default coin)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a target check FAILs or bytes differ from the prediction")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no benchmark: print saved JSON files as Markdown tables")
    ap.add_argument("--full", action="store_true",
                    help="with --report: every column, one table per d")
    a = ap.parse_args(argv)
    a.ds = [parse_size(x) for x in a.d.split(",") if x.strip()]
    a.transports = [x.strip() for x in a.transports.split(",") if x.strip()]
    a.schedules = [x.strip() for x in a.schedules.split(",") if x.strip()] if a.schedules else None
    a.variants = [x.strip() for x in a.variants.split(",") if x.strip()] if a.variants else None
    a.error = ap.error  # check_names runs later: the library's names load numba
    for t in a.transports:
        if t not in ("mpi", "horovod"):
            ap.error(f"unknown transport {t!r}")
    if a.repeat < 1 or a.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    return a


def check_names(a):
    """Fill in and check the schedule, variant and tie names against the library's (after
    ``pin_threads``: importing them loads numba)."""
    schedules, variants, ties = vote_vocabulary()
    a.schedules = a.schedules or list(schedules)
    a.variants = a.variants or list(variants)
    for kind, names, known in (("schedule", a.schedules, schedules),
                               ("variant", a.variants, variants), ("tie", [a.tie], ties)):
        for x in names:
            if x not in known:
                a.error(f"unknown {kind} {x!r} (choose from {', '.join(known)})")


# ---------------------------------------------------------------------------------------
# measuring

class Bench:
    def __init__(self, comm, MPI, repeat, warmup):
        self.comm, self.MPI = comm, MPI
        self.repeat, self.warmup = repeat, warmup

    def run(self, methods):
        """``common.interleave``: every method ``warmup + repeat`` times, in turns (the
        first method rotates with the repeat), all ranks at a barrier before each call, a
        call's time the slowest rank's.  Fills ``method.times`` (timed repeats only)."""
        interleave(methods, self.repeat, self.warmup, barrier=self.comm.Barrier,
                   allmax=lambda dt: self.comm.allreduce(dt, op=self.MPI.MAX), rotate=True)

    def max_min(self, value):
        return (self.comm.allreduce(value, op=self.MPI.MAX),
                self.comm.allreduce(value, op=self.MPI.MIN))


def packed_bits(d, rank):
    """This rank's packed bits to vote on (uniform random, a fixed seed per rank)."""
    import numpy as np
    return random_packed(d, np.random.default_rng(1000 + rank))


class VoteMethod(Method):
    """``schedule.vote(packed, d, step=i)`` with the ledger's bytes of each repeat."""

    def __init__(self, transport, tname, sched, variant, d, packed, args):
        from signcomm.vote import make_schedule
        self.transport, self.tname, self.d, self.packed = transport, tname, d, packed
        self.s = make_schedule(sched, transport, variant=variant, tie=args.tie, seed=0)
        self.sched, self.variant, self.tie = sched, variant, args.tie
        self.per_rep, self.vote = [], None
        super().__init__(self._fn, self._before, self._after)

    def _key(self, i):
        return (self.sched, self.variant, self.d, i)

    def _before(self, i):
        self.transport.ledger.begin_step(self._key(i))

    def _fn(self, i):
        self.vote = self.s.vote(self.packed, self.d, i)

    def _after(self, i):
        summ = self.transport.ledger.summary(self._key(i))
        self.per_rep.append((summ.data_bytes_sent, summ.data_bytes_received, summ.seconds, summ.calls))
        self.transport.ledger.summaries.pop(self._key(i), None)

    def record(self, bench):
        import numpy as np

        from signcomm import kernels as K
        d, predicted = self.d, self.s.predicted_bytes(self.d)
        timed_reps = self.per_rep[bench.warmup:]
        sent = {r[0] for r in self.per_rep}
        received = {r[1] for r in self.per_rep}
        mine_ok = int(sent == {predicted} and received == {predicted})
        sent_max, sent_min = bench.max_min(max(sent))
        recv_max, recv_min = bench.max_min(max(received))
        all_ok = bench.comm.allreduce(mine_ok, op=bench.MPI.MIN)
        comm_s = bench.comm.allreduce(statistics.median(r[2] for r in timed_reps), op=bench.MPI.MAX)
        # the vote of the last repeat: the same step for every method of this d
        bits = np.array(self.vote.bits[: K.packed_nbytes(d)], copy=True)
        K.clear_padding(bits, d)
        crc = zlib.crc32(bits.tobytes())
        crc_max, crc_min = bench.max_min(crc)
        return {
            "kind": "vote", "schedule": self.sched, "transport": self.tname,
            "variant": self.variant, "tie": self.tie, "n": bench.comm.Get_size(), "d": d,
            "seconds": statistics.median(self.times), "seconds_min": min(self.times),
            "all_seconds": self.times, "comm_seconds": comm_s,
            "bytes_sent": sent_max, "bytes_received": recv_max,
            "bytes_equal_on_all_ranks": sent_max == sent_min and recv_max == recv_min,
            "predicted_bytes": predicted, "bytes_match_predicted": bool(all_ok),
            "calls": timed_reps[-1][3] if timed_reps else None,
            "vote_crc32": crc, "vote_identical_on_all_ranks": crc_max == crc_min,
            "bytes_source": "ledger",
        }


def vote_methods(transport, tname, d, packed, args):
    return [VoteMethod(transport, tname, sched, variant, d, packed, args)
            for sched in args.schedules for variant in args.variants]


def baseline_record(name, transport, n, d, method, nbytes):
    return {"kind": "baseline", "schedule": name, "transport": transport, "variant": None,
            "n": n, "d": d, "seconds": statistics.median(method.times),
            "seconds_min": min(method.times), "all_seconds": method.times,
            "bytes_sent": nbytes, "bytes_received": nbytes, "bytes_source": "ring formula"}


def run_mpi(bench, args, n, rank):
    import numpy as np

    from signcomm.comm import get_transport
    comm = bench.comm
    transport = get_transport("mpi")
    records = []
    for d in args.ds:
        x = np.random.default_rng(rank).standard_normal(d, dtype=np.float32)
        fp32 = Method(mpi_fp32_allreduce(comm, x))
        votes = vote_methods(transport, "mpi", d, packed_bits(d, rank), args)
        bench.run([fp32] + votes)
        records.append(baseline_record("fp32_allreduce", "mpi", n, d, fp32, fp32_allreduce_bytes(d, n)))
        records += [v.record(bench) for v in votes]
        del x, fp32, votes
        say(comm, f"  mpi     d={d:>11,}: done at {time.perf_counter() - T0:.1f} s")
    return records


def init_horovod(comm, MPI):
    """``horovod.torch`` initialised on the same ranks, or (None, why not)."""
    why = None
    hvd = None
    try:
        import horovod.torch as hvd  # noqa: F811
        import torch
        torch.set_num_threads(threads_per_rank(comm.Get_size()))
        hvd.init()
        if hvd.size() != comm.Get_size() or hvd.rank() != comm.Get_rank():
            why = (f"Horovod sees rank {hvd.rank()} of {hvd.size()}, MPI rank "
                   f"{comm.Get_rank()} of {comm.Get_size()}")
    except Exception as exc:  # ImportError, or an init failure
        why = f"{type(exc).__name__}: {exc}"
    ok = comm.allreduce(0 if why else 1, op=MPI.MIN)
    if not ok:
        return None, why or "Horovod failed on another rank"
    return hvd, None


def run_horovod(bench, args, n, rank, hvd):
    import numpy as np
    import torch

    from signcomm.comm import get_transport
    transport = get_transport("horovod")
    records = []
    for d in args.ds:
        xt = torch.from_numpy(np.random.default_rng(rank).standard_normal(d, dtype=np.float32))
        fp32 = Method(hvd_allreduce(hvd, xt, f"bench.fp32.{d}"))
        fp16 = Method(hvd_allreduce(hvd, xt, f"bench.fp16.{d}", compression=hvd.Compression.fp16))
        votes = vote_methods(transport, "horovod", d, packed_bits(d, rank), args)
        bench.run([fp32, fp16] + votes)
        records.append(baseline_record("fp32_allreduce", "horovod", n, d, fp32,
                                       fp32_allreduce_bytes(d, n)))
        records.append(baseline_record("fp16_allreduce", "horovod", n, d, fp16,
                                       fp32_allreduce_bytes(d, n, itemsize=2)))
        records += [v.record(bench) for v in votes]
        del xt, votes
        say(bench.comm, f"  horovod d={d:>11,}: done at {time.perf_counter() - T0:.1f} s")
    return records


def warm_kernels(comm):
    """Compile (or load from numba's cache) the kernels on rank 0 first, then on the
    others: n ranks compiling at once on a few cores takes minutes after a kernel edit."""
    import numpy as np

    from signcomm import kernels as K
    for turn in (0, 1):
        if (comm.Get_rank() == 0) == (turn == 0):
            try:
                from signcomm.kernels.warmup import warmup
                warmup()
            except ImportError:
                pass
            key = K.key64(0, 1, 0)
            for n in (2, 3):
                g = np.zeros((n, 10), np.uint8)
                for variant in vote_vocabulary()[1]:
                    K.majority_vote(g, 77, variant=variant, key=key)
                    K.vote_from_counts(K.vote_counts(g, 77), n, variant=variant, key=key)
                K.unpack_count_fields(K.pack_count_fields(g[0], 77, 2), 77, 2)
        comm.Barrier()


def source_state():
    """The git commit and the uncommitted changes under signcomm/ (what was measured)."""
    import hashlib
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout
        except Exception:
            return ""
    diff = git("diff", "HEAD", "--", "signcomm")
    return {"commit": git("rev-parse", "HEAD").strip(),
            "signcomm_uncommitted": git("status", "--porcelain", "--", "signcomm").split("\n")[:-1],
            "signcomm_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


def say(comm, text):
    if comm.Get_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def annotate(records):
    """Add the baseline times/bytes and the ratios to every vote record."""
    base = {(r["schedule"], r["transport"], r["d"]): r for r in records if r["kind"] == "baseline"}

    def sec(name, transport, d):
        r = base.get((name, transport, d))
        return r["seconds"] if r else None

    for r in records:
        d, n = r["d"], r["n"]
        fp32_bytes, fp16_bytes = fp32_allreduce_bytes(d, n), fp32_allreduce_bytes(d, n, itemsize=2)
        r["fp32_allreduce_bytes"] = fp32_bytes
        r["fp16_allreduce_bytes"] = fp16_bytes
        r["fp32_mpi_allreduce_seconds"] = sec("fp32_allreduce", "mpi", d)
        r["fp32_hvd_allreduce_seconds"] = sec("fp32_allreduce", "horovod", d)
        r["fp16_hvd_allreduce_seconds"] = sec("fp16_allreduce", "horovod", d)
        # the fp32 allreduce of the record's own transport (mpi4py for mpi, hvd for horovod)
        r["fp32_allreduce_seconds"] = sec("fp32_allreduce", r["transport"], d)
        moved = max(r["bytes_sent"], r["bytes_received"])
        r["bytes_ratio_vs_fp32"] = moved / fp32_bytes if fp32_bytes else None
        r["bytes_ratio_vs_fp16"] = moved / fp16_bytes if fp16_bytes else None
        for key, ref in (("time_ratio_vs_fp32", r["fp32_allreduce_seconds"]),
                         ("time_ratio_vs_mpi_fp32", r["fp32_mpi_allreduce_seconds"]),
                         ("time_ratio_vs_hvd_fp32", r["fp32_hvd_allreduce_seconds"]),
                         ("time_ratio_vs_hvd_fp16", r["fp16_hvd_allreduce_seconds"])):
            r[key] = r["seconds"] / ref if ref else None
    return records


def check_targets(records):
    """PASS/FAIL lines (and whether all passed) for the byte targets and the ledger."""
    lines, ok = [], True
    votes = [r for r in records if r["kind"] == "vote"]
    for sched, max_n in TARGETS.items():
        for d in sorted({r["d"] for r in votes}):
            rs = [r for r in votes if r["schedule"] == sched and r["d"] == d]
            if not rs:
                continue
            n = rs[0]["n"]
            worst = max(rs, key=lambda r: r["bytes_ratio_vs_fp32"])
            ratio = worst["bytes_ratio_vs_fp32"]
            cover = f"n <= {max_n}" if max_n else "every n"
            if max_n is not None and n > max_n:
                lines.append(f"SKIP {sched:9s} n={n} d={d:,}: target covers {cover} only "
                             f"(bytes/fp32 = 1/{1 / ratio:.1f})")
                continue
            good = ratio <= TARGET_RATIO
            ok &= good
            lines.append(f"{'PASS' if good else 'FAIL'} {sched:9s} n={n} d={d:,}: bytes per rank "
                         f"{max(worst['bytes_sent'], worst['bytes_received']):,} = 1/{1 / ratio:.1f} "
                         f"of fp32 allreduce's {worst['fp32_allreduce_bytes']:,} "
                         f"(target <= 1/25 for {cover})")
    bad = [r for r in votes if not r["bytes_match_predicted"]]
    lines.append(("PASS" if not bad else "FAIL") + " ledger bytes == schedule.predicted_bytes(d) "
                 f"on every rank for {len(votes) - len(bad)}/{len(votes)} measurements"
                 + "".join(f"\n     mismatch: {r['schedule']}/{r['transport']}/{r['variant']} d={r['d']:,}: "
                           f"ledger {r['bytes_sent']:,}/{r['bytes_received']:,}, predicted "
                           f"{r['predicted_bytes']:,}" for r in bad))
    ok &= not bad
    # the same step and variant must give the same vote on every rank and in every schedule
    groups = {}
    for r in votes:
        groups.setdefault((r["variant"], r["d"]), set()).add(r["vote_crc32"])
    split = [k for k, v in groups.items() if len(v) > 1]
    ranks_bad = [r for r in votes if not r["vote_identical_on_all_ranks"]]
    good = not split and not ranks_bad
    lines.append(("PASS" if good else "FAIL") + " the vote is identical on every rank, and across "
                 "schedules and transports for the same variant and step"
                 + (f" (differs: {split}, rank-split: {len(ranks_bad)})" if not good else ""))
    ok &= good
    return lines, ok


# ---------------------------------------------------------------------------------------
# output

def _ms(s):
    return "-" if s is None else f"{1e3 * s:.1f}" if s >= 0.01 else f"{1e3 * s:.2f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}"


def _frac(v):
    return "1" if v is not None and abs(v - 1) < 1e-12 else "-" if not v else f"1/{1 / v:.1f}"


def _label(r):
    if r["kind"] == "baseline":
        return {"fp32_allreduce": "fp32 allreduce", "fp16_allreduce": "fp16 allreduce (hvd compression)"}[r["schedule"]]
    return r["schedule"]


COLUMNS = ["method", "transport", "var", "ms/vote", "sent B/rank", "recv B/rank", "bytes/fp32",
           "t/fp32 same", "t/fp32 mpi", "t/fp32 hvd", "t/fp16 hvd"]


def rows_for(records, d):
    rs = _sorted([r for r in records if r["d"] == d])
    rows = []
    for r in rs:
        rows.append([_label(r), r["transport"], r["variant"] or "-", _ms(r["seconds"]),
                     f"{r['bytes_sent']:,}", f"{r['bytes_received']:,}",
                     _frac(max(r["bytes_sent"], r["bytes_received"]) / r["fp32_allreduce_bytes"]),
                     _x(r.get("time_ratio_vs_fp32")), _x(r.get("time_ratio_vs_mpi_fp32")),
                     _x(r.get("time_ratio_vs_hvd_fp32")), _x(r.get("time_ratio_vs_hvd_fp16"))])
    return rows


def text_table(records, d):
    rows = [COLUMNS] + rows_for(records, d)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(records, d):
    rows = rows_for(records, d)
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) - 3)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def title(n, d):
    name = NAMES.get(d)
    return f"n = {n}, d = {d:,}" + (f" ({name})" if name else "")


def _sorted(records):
    order = {"fp32_allreduce": 0, "fp16_allreduce": 1}
    order.update({s: 2 + k for k, s in enumerate(vote_vocabulary()[0])})
    return sorted(records, key=lambda r: (r["kind"] != "baseline", order.get(r["schedule"], 9),
                                          r["transport"] != "mpi", r["variant"] or ""))


def compact_table(records):
    """One Markdown table for one n: a row per method, for each d the median ms and the
    time ratio to the fp32 allreduce of the same transport; bytes at the largest d."""
    ds = sorted({r["d"] for r in records})
    big = ds[-1]
    head = ["method", "transport", "var", f"B/rank sent = recv ({NAMES.get(big, f'd={big:,}')})",
            "bytes / fp32"]
    for d in ds:
        name = NAMES.get(d, f"{d:,}")
        head += [f"ms {name}", f"t/fp32 {name}"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    at = {(r["schedule"], r["transport"], r["variant"], r["d"]): r for r in records}
    for r in _sorted([r for r in records if r["d"] == big]):
        key = (r["schedule"], r["transport"], r["variant"])
        row = [_label(r), r["transport"], r["variant"] or "-", f"{r['bytes_sent']:,}",
               _frac(max(r["bytes_sent"], r["bytes_received"]) / r["fp32_allreduce_bytes"])]
        for d in ds:
            x = at.get(key + (d,))
            row += [_ms(x["seconds"]) if x else "-", _x(x.get("time_ratio_vs_fp32")) if x else "-"]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def report(paths, full=False):
    for path in paths:
        data = json.loads(Path(path).read_text())
        records = data["records"]
        meta = data.get("meta", {})
        n = records[0]["n"]
        if full:
            for d in sorted({r["d"] for r in records}):
                print(f"**{title(n, d)}**; fp32 ring allreduce: {fp32_allreduce_bytes(d, n):,} B per rank "
                      "each way\n")
                print(md_table(records, d) + "\n")
        else:
            print(f"**n = {n}** (median of {meta.get('repeat')} repeats; load average before/after "
                  + "/".join(f"{x:.1f}" for x in meta.get("loadavg_before", [])[:1] + meta.get("loadavg_after", [])[:1])
                  + f"; run took {meta.get('wall_seconds', 0):.0f} s)\n")
            print(compact_table(records) + "\n")
            print("```\n" + "\n".join(meta.get("checks", [])) + "\n```\n")


# ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report(args.report, full=args.full)
        return 0
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    pin_threads(n)  # before numba/torch are imported
    check_names(args)
    bench = Bench(comm, MPI, args.repeat, args.warmup)
    t_start = time.perf_counter()
    load = os.getloadavg()
    say(comm, f"comm_bench ({time.perf_counter() - T0:.1f} s after start): n={n}, d={args.ds}, repeat={args.repeat}, warmup={args.warmup}, "
              f"NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}, cpus={os.cpu_count()}")
    records, notes = [], []
    warm_kernels(comm)
    say(comm, f"  kernels ready at {time.perf_counter() - T0:.1f} s")
    src = source_state() if rank == 0 else None
    if "mpi" in args.transports:
        records += run_mpi(bench, args, n, rank)
    if "horovod" in args.transports:
        hvd, why = init_horovod(comm, MPI)
        if hvd is None:
            notes.append(f"horovod skipped: {why}")
            say(comm, "  " + notes[-1])
        else:
            records += run_horovod(bench, args, n, rank, hvd)
    annotate(records)
    lines, ok = check_targets(records)
    if rank == 0:
        for d in args.ds:
            print(f"\n{title(n, d)}; fp32 ring allreduce moves {fp32_allreduce_bytes(d, n):,} B per rank each way")
            print(text_table(records, d))
        print()
        for line in lines:
            print(line)
        for note in notes:
            print("NOTE", note)
        print(f"(median of {args.repeat} repeats, max over ranks; ms/vote: packed bits -> Vote on "
              "every rank; t/...: time ratio vs that baseline; bytes from the ledger)")
        meta = {"n": n, "ds": args.ds, "repeat": args.repeat, "warmup": args.warmup, "tie": args.tie,
                "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                "numba_threads": os.environ.get("NUMBA_NUM_THREADS"),
                "env": {k: v for k, v in os.environ.items() if k.startswith(("MPIR_CVAR_", "HOROVOD_"))},
                "loadavg_before": load, "loadavg_after": os.getloadavg(),
                "wall_seconds": time.perf_counter() - t_start, "source": src, "checks": lines, "notes": notes,
                "command": " ".join([Path(sys.executable).name] + sys.argv)}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
            print(f"wrote {len(records)} records to {args.json}")
    failed = comm.bcast(0 if ok else 1, root=0)
    return failed if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
