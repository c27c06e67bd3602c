#!/usr/bin/env python3
"""An alpha-beta cost model of fp32 allreduce and the three one-bit vote schedules,
calibrated on the emulated-cluster measurements, validated against them, and
extrapolated to n = 1024.

    .venv/bin/python benchmarks/netem/cost_model.py [--results benchmarks/results]
    .venv/bin/python benchmarks/netem/cost_model.py --predict --n 1024 --d 25.6e6 --gbit 10
    .venv/bin/python benchmarks/netem/cost_model.py --machines --gbit 25   # machines of 8 GPUs

Communication, per collective c (allreduce, allgather, alltoall, Horovod's fp32 and
fp16 allreduce), for n ranks, m bytes per rank and a link rate B (bytes/s)::

    T_c = (alpha_c + sched_c * max(0, n / cores - 1)) * rounds_c(n)
          + max(bytes_c(n, m) / (eff * B), host_c * n * bytes_c(n, m))

- ``rounds``: 2 ceil(log2 n) for allreduce (MPICH's reduce-scatter + allgather for long
  messages), n - 1 for allgather (ring) and alltoall (pairwise), ceil(log2 n) for
  Horovod's fp16 allreduce (an MPI user-defined op, which MPICH runs by recursive
  doubling: measured wire bytes log2(n) * 2d, not 2 (n-1)/n * 2d);
- ``bytes``: payload on the busiest link in one direction (the floor's numerator);
- ``eff``: the fraction of the link rate the payload gets (TCP/IP/Ethernet headers:
  1448/1514 = 0.956; the 2-rank link proof measures 0.93-0.96 at 1 Gbit/s).  Fixed at
  0.95, not fitted: fitted together with ``host`` on noisy points it drifts above 1.
- ``host``: seconds per byte per rank of the *emulation host*: all n ranks' TCP stacks,
  the bridge and the reductions share one 2-core machine, so a byte costs CPU time n
  times over; link and CPU work overlap, hence the max.  A real cluster has one host per
  rank: predictions for it set host = 0.
- ``alpha``: seconds per round with a core per rank (n <= cores);
- ``sched``: the extra seconds per round once ranks outnumber cores: up to 8
  busy-polling ranks (and other people's jobs) share 2 cores, and each round waits for a
  peer to be scheduled (the 8-byte half round trip measures ~20 us at n = 2 and
  milliseconds at n = 4 and 8).  A real cluster has a core per rank: sched = 0 there.
  The extrapolation shows alpha as fitted and, as a sensitivity case, ``--alpha-us``
  (default 50 us, a typical MPI-over-TCP latency per message on dedicated hosts).

Compute of a vote schedule (pack/popcount/count fields/S_1), per rank::

    T_compute = gamma_s * work_s(n, d) * max(1, n / cores)

with work = n d (allgather: every rank counts all n vectors), d (sharded, packed-count),
and the contention factor only on the emulation host (1 on a real cluster).

The parameters are fitted by least squares on log(predicted / measured), from the raw
collectives (``raw_*``, ``fp32_allreduce``, ``hvd_*``) at the ``--calibrate-gbit`` rates
(default 1 Gbit/s) only; the vote schedules' communication (``comm_seconds``: time inside
their collectives) and every point at the other rates are then predicted from the same
parameters, out of sample.  ``gamma`` is fitted from the schedules'
compute time (seconds - comm_seconds).

Machines of k = 8 GPUs (the extrapolation's third row, ``machines_of_8_gpus`` in the
JSON, ``--machines``): H = 1..128 machines, each with one NIC shared by its GPUs and a
fast per-GPU link inside; the flat sharded vote over all 8H GPUs against the hierarchical
vote (machine mean inside, the machines' vote of each 1/k shard, allgather inside) and a
node-aware fp32 allreduce.  It uses only byte counts (``machine_cross_bytes``, checked
against benchmarks/netem/hier_bench.py's record) and per-round latencies; nothing fitted
on this box, whose rounds are bound by its 2 shared cores, not by a network.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/
from common import ROOT, count_field_words, ring_allreduce_bytes, vote_vocabulary  # noqa: E402

CORES = 2


def log2c(n):
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def ring(m, n):
    return ring_allreduce_bytes(m, n)


# collective -> (rounds(n), bytes_on_busiest_link(n, m))
COLLECTIVES = {
    "allreduce": (lambda n: 2 * log2c(n), ring),
    "allgather": (lambda n: n - 1, lambda m, n: (n - 1) * m),
    "alltoall": (lambda n: n - 1, lambda m, n: (n - 1) * m),
    "hvd_allreduce": (lambda n: 2 * log2c(n), ring),
    "hvd_fp16_allreduce": (lambda n: log2c(n), lambda m, n: log2c(n) * m),
}


def packed(d):
    return math.ceil(d / 8)


def shard(d, n):
    return math.ceil(packed(d) / n)


# method -> list of (collective, bytes per rank m(n, d)) it runs per step
METHOD_COLLECTIVES = {
    "fp32_allreduce": [("allreduce", lambda n, d: 4 * d)],
    "hvd_fp32_allreduce": [("hvd_allreduce", lambda n, d: 4 * d)],
    "hvd_fp16_allreduce": [("hvd_fp16_allreduce", lambda n, d: 2 * d)],
    "raw_allgather": [("allgather", lambda n, d: packed(d))],
    "raw_sharded": [("alltoall", lambda n, d: shard(d, n)), ("allgather", lambda n, d: shard(d, n))],
    "raw_count_allreduce": [("allreduce", lambda n, d: 8 * count_field_words(d, n))],
}
# each vote schedule (signcomm.vote.SCHEDULES) runs the collectives of its raw_* method
RAW_OF_SCHEDULE = {"allgather": "raw_allgather", "sharded": "raw_sharded",
                   "allreduce": "raw_count_allreduce"}
SCHEDULES, VARIANTS, _ = vote_vocabulary()
for s in SCHEDULES:
    for v in VARIANTS:
        METHOD_COLLECTIVES[f"vote_{s}_{v}"] = METHOD_COLLECTIVES[RAW_OF_SCHEDULE[s]]
    METHOD_COLLECTIVES[f"signvote_{s}_v2"] = METHOD_COLLECTIVES[f"vote_{s}_v2"]

CALIBRATION = ("fp32_allreduce", "hvd_fp32_allreduce", "hvd_fp16_allreduce", "raw_allgather",
               "raw_sharded", "raw_count_allreduce")

# compute work per rank, in coordinates, of each schedule's vote
WORK = {"allgather": lambda n, d: n * d, "sharded": lambda n, d: d, "allreduce": lambda n, d: d}


def schedule_of(method):
    parts = method.split("_")
    return parts[1] if parts[0] in ("vote", "signvote") else None


EFF = 0.95


class CostModel:
    def __init__(self, params=None, gamma=None, eff=EFF):
        # params[c] = (alpha, sched, host)
        self.params = params or {}
        self.gamma = gamma or {}
        self.eff = eff
        self.alpha_override = None   # seconds per round for every collective, if set

    def collective_time(self, coll, n, m, gbit, host=True):
        alpha, sched, h = self.params[coll]
        if self.alpha_override is not None:
            alpha = self.alpha_override
        rounds, nbytes = COLLECTIVES[coll]
        b = nbytes(m, n)
        link = b / (self.eff * gbit * 1e9 / 8)
        if not host:  # a real cluster: a host (and a core) per rank
            return alpha * rounds(n) + link
        return (alpha + sched * max(0.0, n / CORES - 1)) * rounds(n) + max(link, h * n * b)

    def comm_time(self, method, n, d, gbit, host=True):
        return sum(self.collective_time(c, n, m(n, d), gbit, host)
                   for c, m in METHOD_COLLECTIVES[method])

    def compute_time(self, method, n, d, contention=True):
        if method not in self.gamma:
            return 0.0
        s = schedule_of(method)
        return self.gamma[method] * WORK[s](n, d) * (max(1.0, n / CORES) if contention else 1.0)

    def step_time(self, method, n, d, gbit, emulated=True):
        return (self.comm_time(method, n, d, gbit, host=emulated)
                + self.compute_time(method, n, d, contention=emulated))

    def floor(self, method, n, d, gbit):
        rate = gbit * 1e9 / 8
        return sum(COLLECTIVES[c][1](m(n, d), n) for c, m in METHOD_COLLECTIVES[method]) / rate

    # -- calibration
    def _fit_one(self, coll, points):
        """points: [(n, m, gbit, measured_seconds, fixed_extra_seconds)]"""
        from scipy.optimize import least_squares

        def resid(x):  # alpha in 0.1 ms, sched in ms, host in ns/byte: similar scales
            self.params[coll] = (x[0] * 1e-4, x[1] * 1e-3, x[2] * 1e-9)
            return [np.log(max(self.collective_time(coll, n, m, g) + extra, 1e-9) / t)
                    for n, m, g, t, extra in points]
        best = None
        for a0 in (0.1, 3.0, 30.0):           # a few starts; the max() makes it non-smooth
            for s0 in (0.1, 3.0, 10.0):
                for h0 in (0.1, 3.0):
                    r = least_squares(resid, [a0, s0, h0], bounds=([0, 0, 0], [1e4, 1e4, 1e3]),
                                      loss="soft_l1")
                    if best is None or r.cost < best.cost:
                        best = r
        self.params[coll] = (best.x[0] * 1e-4, best.x[1] * 1e-3, best.x[2] * 1e-9)

    def fit(self, records):
        ok = [r for r in records if r.get("seconds") is not None and r.get("gbit_per_s")]
        by_coll = {}
        for r in ok:
            calls = METHOD_COLLECTIVES.get(r["method"])
            if r["method"] in CALIBRATION and len(calls) == 1:
                c, m = calls[0]
                by_coll.setdefault(c, []).append((r["n"], m(r["n"], r["d"]), r["gbit_per_s"],
                                                  r["seconds"], 0.0))
        for c, pts in by_coll.items():
            self._fit_one(c, pts)
        # alltoall appears only inside raw_sharded (alltoall + allgather of the shards)
        if "allgather" in self.params:
            pts = []
            for r in ok:
                if r["method"] == "raw_sharded":
                    n, d, g = r["n"], r["d"], r["gbit_per_s"]
                    pts.append((n, shard(d, n), g, r["seconds"],
                                self.collective_time("allgather", n, shard(d, n), g)))
            if pts:
                self._fit_one("alltoall", pts)
        # compute: gamma per vote method from (seconds - comm_seconds)
        for key in sorted({r["method"] for r in ok if schedule_of(r["method"])}):
            pts = [(r["seconds"] - r["comm_seconds"],
                    WORK[schedule_of(key)](r["n"], r["d"]) * max(1.0, r["n"] / CORES))
                   for r in ok if r["method"] == key]
            pts = [(t, w) for t, w in pts if t > 0]
            if pts:  # median of per-point ratios: robust to the noisy shared machine
                self.gamma[key] = float(np.median([t / w for t, w in pts]))
        return self

    def to_json(self):
        return {"eff": self.eff,
                "params": {c: {"alpha_s": p[0], "sched_s_per_round": p[1],
                               "host_s_per_byte_per_rank": p[2]}
                           for c, p in self.params.items()},
                "gamma_s_per_coord": self.gamma}

    @classmethod
    def from_json(cls, j):
        return cls({c: (p["alpha_s"], p["sched_s_per_round"], p["host_s_per_byte_per_rank"])
                    for c, p in j["params"].items()},
                   j["gamma_s_per_coord"], j["eff"])


def validate(model, records):
    rows = []
    for r in records:
        m = r["method"]
        if r.get("seconds") is None or m not in METHOD_COLLECTIVES or not r["gbit_per_s"]:
            continue
        n, d, g = r["n"], r["d"], r["gbit_per_s"]
        comm_pred = model.comm_time(m, n, d, g)
        comm_meas = r.get("comm_seconds", r["seconds"])
        total_pred = model.step_time(m, n, d, g)
        rows.append({"method": m, "n": n, "d": d, "gbit_per_s": g,
                     "in_sample": m in CALIBRATION,
                     "comm_measured": comm_meas, "comm_predicted": comm_pred,
                     "comm_rel_error": comm_pred / comm_meas - 1,
                     "step_measured": r["seconds"], "step_predicted": total_pred,
                     "step_rel_error": total_pred / r["seconds"] - 1})
    return rows


def summarize(rows, key, sel):
    e = np.array([abs(r[key]) for r in rows if sel(r)])
    if e.size == 0:
        return None
    return {"points": int(e.size), "median_abs_rel_error": float(np.median(e)),
            "p90_abs_rel_error": float(np.percentile(e, 90)), "max_abs_rel_error": float(e.max())}


EXTRAP = [("fp32_allreduce", "fp32 allreduce (MPI)", "C0"),
          ("hvd_fp16_allreduce", "fp16 allreduce (Horovod)", "C2"),
          ("vote_allgather_v1", "allgather vote", "C3"),
          ("vote_sharded_v1", "sharded vote", "C4"),
          ("vote_allreduce_v1", "packed-count allreduce vote", "C5")]


# --------------------------------------------------------------------------- machines
MACHINE_GPUS = 8
MACHINE_HS = [1, 2, 4, 8, 16, 32, 64, 128]
MACHINE_METHODS = [("flat", "flat sharded vote", "C4"),
                   ("hier", "hierarchical sharded vote", "C1"),
                   ("fp32", "fp32 allreduce (node-aware)", "C0")]


def machine_cross_bytes(method, H, k, d):
    """Bytes one machine's NIC sends per step (its k ranks together), for d coordinates on
    H machines of k ranks:

    - ``flat``: the sharded vote over n = H k ranks (2 (n - 1) pieces of ceil(d/8)/n
      bytes per rank, alltoall + allgather), of which the 2 (n - k) to ranks on other
      machines leave it (the ledger's count without the machine's own pieces; MPICH's
      ring allgather in rank order keeps a little more inside: measured 6% less at 4 x 2);
    - ``hier``: the machines' vote (docs/algorithms.md): each rank votes on its 1/k shard
      of the coordinates with the H - 1 ranks holding it elsewhere, 2 (H - 1) pieces of
      ceil(d/(8k))/H bytes: 1/k of ``flat`` when H >> 1;
    - ``fp32``: a node-aware fp32 allreduce (reduce-scatter inside, a ring allreduce of
      4d/k bytes among the H ranks of each local index, allgather inside), which MPICH's
      MPI_Allreduce and NCCL already do (measured: flat and hierarchical fp32 cross the
      same bytes at 4 x 2)."""
    n = H * k
    if method == "flat":
        return k * 2 * (n - k) * shard(d, n)
    if method == "hier":
        return k * 2 * (H - 1) * shard(math.ceil(d / k), H)
    if method == "fp32":
        return k * ring(4 * math.ceil(d / k), H)
    raise ValueError(method)


def machine_comm_time(model, method, H, k, d, gbit, alpha_s, intra_gbyte, intra_alpha_s):
    """Seconds of communication per step on H dedicated machines of k GPUs: one NIC of
    ``gbit`` per machine (shared by its k GPUs, payload efficiency ``model.eff``), a
    per-GPU link of ``intra_gbyte`` GB/s inside (NVLink-like), ``alpha_s`` per round
    between machines and ``intra_alpha_s`` inside.  Vote compute is left out (a GPU's
    pack/vote of d coordinates is well under the NIC time)."""
    n = H * k
    nic = model.eff * gbit * 1e9 / 8
    intra = intra_gbyte * 1e9
    cross = machine_cross_bytes(method, H, k, d) / nic
    if method == "flat":      # 2 (n - 1) rounds, each as slow as its slowest (remote) peer
        rounds = 2 * (n - 1) * (alpha_s if H > 1 else intra_alpha_s)
        return rounds + cross + 2 * (k - 1) * shard(d, n) / intra
    if method == "hier":      # machine mean (fp32 alltoall), vote among H, allgather of bits
        dk = math.ceil(d / k)
        inside = 2 * (k - 1) * intra_alpha_s + ((k - 1) * 4 * dk + (k - 1) * packed(dk)) / intra
        return inside + 2 * (H - 1) * alpha_s + cross
    if method == "fp32":
        inside = 2 * (k - 1) * intra_alpha_s + 2 * (k - 1) * 4 * math.ceil(d / k) / intra
        return inside + 2 * log2c(H) * alpha_s + cross
    raise ValueError(method)


def machines_extrapolation(model, d=25.6e6, rates=(1, 10, 25), k=MACHINE_GPUS, hs=MACHINE_HS,
                           alpha_us=50.0, intra_gbyte=100.0, intra_alpha_us=10.0):
    """{rate: {method: {H: seconds}}} plus the hierarchical / flat ratios of seconds and of
    NIC bytes, for machines of k GPUs, H = 1..128."""
    d = int(d)
    out = {"k": k, "alpha_us": alpha_us, "intra_gbyte_per_s": intra_gbyte,
           "intra_alpha_us": intra_alpha_us, "d": d, "seconds": {}, "nic_bytes": {},
           "hier_over_flat_seconds": {}, "hier_over_flat_bytes": {}}
    for m, _, _ in MACHINE_METHODS:
        out["nic_bytes"][m] = {H: machine_cross_bytes(m, H, k, d) for H in hs}
    for g in rates:
        sec = {m: {H: machine_comm_time(model, m, H, k, d, g, alpha_us * 1e-6, intra_gbyte,
                                        intra_alpha_us * 1e-6) for H in hs}
               for m, _, _ in MACHINE_METHODS}
        out["seconds"][f"{g:g}Gbit"] = sec
        out["hier_over_flat_seconds"][f"{g:g}Gbit"] = {
            H: sec["hier"][H] / sec["flat"][H] for H in hs if H > 1}
    out["hier_over_flat_bytes"] = {H: out["nic_bytes"]["hier"][H] / out["nic_bytes"]["flat"][H]
                                   for H in hs if H > 1}
    return out


def machines_table(ext):
    """The extrapolation as a markdown table (ms per step; NIC MB per machine)."""
    hs = sorted(next(iter(ext["nic_bytes"].values())))
    lines = ["| rate | method | " + " | ".join(f"H={H}" for H in hs) + " |",
             "|---|---|" + "---|" * len(hs)]
    for g, sec in ext["seconds"].items():
        for m, label, _ in MACHINE_METHODS:
            lines.append(f"| {g} | {label} | " + " | ".join(
                f"{1e3 * sec[m][H]:.1f}" for H in hs) + " |")
    for m, label, _ in MACHINE_METHODS:
        lines.append(f"| NIC MB per machine | {label} | " + " | ".join(
            f"{ext['nic_bytes'][m][H] / 1e6:.1f}" for H in hs) + " |")
    return "\n".join(lines)


def crossover(model, method, d, gbit, with_compute, ns):
    """Smallest n at which ``method`` is no faster than fp32 allreduce (None: never)."""
    for n in ns:
        t = (model.step_time(method, n, d, gbit, emulated=False) if with_compute
             else model.comm_time(method, n, d, gbit, host=False))
        base = model.comm_time("fp32_allreduce", n, d, gbit, host=False)
        if t >= base:
            return n
    return None


def extrapolate(model, out, d=25.6e6, rates=(1, 10, 25), alpha_us=50.0, intra_gbyte=100.0,
                intra_alpha_us=10.0):
    """Predictions for a real cluster (one host per rank: no host term, no contention),
    n = 2..1024, with alpha as fitted here (top row) and alpha = alpha_us (bottom row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [2 ** k for k in range(1, 11)]
    nfine = sorted(set(list(range(2, 129)) + [int(x) for x in np.geomspace(128, 1024, 60)]))
    fig, axes = plt.subplots(3, len(rates), figsize=(6 * len(rates), 13.5), squeeze=False)
    table, cross = {}, {}
    for row, (case, alpha) in enumerate((("alpha fitted on this box", None),
                                         (f"alpha = {alpha_us:g} us", alpha_us * 1e-6))):
        model.alpha_override = alpha
        for ax, g in zip(axes[row], rates):
            for m, label, color in EXTRAP:
                comm = [model.comm_time(m, n, d, g, host=False) for n in ns]
                ax.plot(ns, comm, "-", color=color, label=label)
                if schedule_of(m):
                    tot = [model.step_time(m, n, d, g, emulated=False) for n in ns]
                    ax.plot(ns, tot, ":", color=color)
                table[f"{m}@{g:g}Gbit, {case}"] = dict(zip(ns, comm))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("ranks n (one host per rank)")
            ax.set_ylabel("seconds per step")
            ax.set_title(f"{g:g} Gbit/s, d = {d / 1e6:.1f}M, {case}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            for m in ("vote_allgather_v1", "vote_sharded_v1", "vote_allreduce_v1"):
                cross[f"{m}@{g:g}Gbit, {case}"] = {
                    "comm_only": crossover(model, m, d, g, False, nfine),
                    "with_compute": crossover(model, m, d, g, True, nfine)}
    model.alpha_override = None
    # third row: machines of 8 GPUs (one NIC each, NVLink-like inside), H = 1..128
    machines = machines_extrapolation(model, d=d, rates=rates, alpha_us=alpha_us,
                                      intra_gbyte=intra_gbyte, intra_alpha_us=intra_alpha_us)
    for ax, g in zip(axes[2], rates):
        sec = machines["seconds"][f"{g:g}Gbit"]
        for m, label, color in MACHINE_METHODS:
            hs = sorted(sec[m])
            ax.plot(hs, [sec[m][H] for H in hs], "-o", ms=3, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"machines H of {machines['k']} GPUs (n = {machines['k']} H)")
        ax.set_ylabel("seconds per step (communication)")
        ax.set_title(f"{g:g} Gbit/s NIC per machine, d = {d / 1e6:.1f}M, alpha = "
                     f"{alpha_us:g} us, {machines['intra_gbyte_per_s']:g} GB/s inside",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[2][0].legend(fontsize=7)
    axes[0][0].legend(fontsize=7, title="solid: communication, dotted: + vote compute (1 core)",
                      title_fontsize=7)
    fig.tight_layout()
    path = Path(out) / "netem_cost_model.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, table, cross, machines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--predict", action="store_true", help="print predictions from the saved fit")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=float, default=25.6e6)
    ap.add_argument("--gbit", type=float, default=1.0)
    ap.add_argument("--calibrate-gbit", type=float, nargs="+", default=[1.0],
                    help="rates whose points calibrate the model (default 1: the only rate at "
                         "which this 2-core box is limited by the link, not by its CPUs); "
                         "the other rates are predicted out of sample")
    ap.add_argument("--alpha-us", type=float, default=None,
                    help="latency per round on dedicated hosts for the second extrapolation "
                         "(default 50); with --predict: use it instead of the fitted alpha")
    ap.add_argument("--machines", action="store_true",
                    help="print the machines-of-8-GPUs extrapolation only (it uses no fitted "
                         "parameter) for --gbit, --d, --alpha-us, --intra-gbyte")
    ap.add_argument("--intra-gbyte", type=float, default=100.0,
                    help="machines row: GB/s per GPU inside a machine (default 100)")
    ap.add_argument("--intra-alpha-us", type=float, default=10.0,
                    help="machines row: latency per round inside a machine (default 10 us)")
    a = ap.parse_args(argv)
    res = Path(a.results)
    if a.machines:
        ext = machines_extrapolation(CostModel(), d=a.d, rates=(a.gbit,),
                                     alpha_us=a.alpha_us or 50.0, intra_gbyte=a.intra_gbyte,
                                     intra_alpha_us=a.intra_alpha_us)
        print(machines_table(ext))
        print("hierarchical / flat: NIC bytes",
              {H: round(v, 3) for H, v in ext["hier_over_flat_bytes"].items()}, "seconds",
              {H: round(v, 3) for H, v in
               ext["hier_over_flat_seconds"][f"{a.gbit:g}Gbit"].items()})
        return 0
    if a.predict:
        saved = json.loads((res / "netem_cost_model.json").read_text())
        model = CostModel.from_json(saved["fit"])
        if a.alpha_us is not None:
            model.alpha_override = a.alpha_us * 1e-6
        d = int(a.d)
        for m, label, _ in EXTRAP:
            print(f"{label:30s} n={a.n} d={d} {a.gbit:g} Gbit/s: comm "
                  f"{model.comm_time(m, a.n, d, a.gbit, host=False):.4f} s, step "
                  f"{model.step_time(m, a.n, d, a.gbit, emulated=False):.4f} s, floor "
                  f"{model.floor(m, a.n, d, a.gbit):.4f} s")
        return 0
    records = json.loads((res / "netem.json").read_text())
    calib = set(a.calibrate_gbit)
    model = CostModel().fit([r for r in records if r.get("gbit_per_s") in calib])
    rows = validate(model, records)
    for r in rows:
        r["in_sample"] = r["in_sample"] and r["gbit_per_s"] in calib
    summary = {}
    for g in sorted({r["gbit_per_s"] for r in rows}):
        tag = f"{g:g} Gbit/s"
        kind = "calibration points" if g in calib else "out of sample"
        summary[f"{tag}: fp32, Horovod and raw collectives ({kind})"] = summarize(
            rows, "comm_rel_error", lambda r, g=g: r["gbit_per_s"] == g and r["method"] in CALIBRATION)
        summary[f"{tag}: vote schedules' communication (out of sample)"] = summarize(
            rows, "comm_rel_error", lambda r, g=g: r["gbit_per_s"] == g and r["method"] not in CALIBRATION)
        summary[f"{tag}: vote schedules' whole step incl. compute"] = summarize(
            rows, "step_rel_error", lambda r, g=g: r["gbit_per_s"] == g and r["method"] not in CALIBRATION)
    by_rate = {"calibrated_on_gbit": sorted(calib)}
    path, table, cross, machines = extrapolate(model, res, alpha_us=a.alpha_us or 50.0,
                                               intra_gbyte=a.intra_gbyte,
                                               intra_alpha_us=a.intra_alpha_us)
    machines["measured_4x2"] = hier_measured(res)
    out = {"fit": model.to_json(), "validation_summary": summary,
           "calibration": by_rate, "validation": rows,
           "extrapolation_d": 25.6e6, "extrapolation_comm_seconds": table,
           "crossover_n_vs_fp32_allreduce": cross,
           "machines_of_8_gpus": machines}
    (res / "netem_cost_model.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({"fit": out["fit"], "validation_summary": summary,
                      "calibration": by_rate,
                      "crossover_n_vs_fp32_allreduce": cross}, indent=1))
    print("machines of 8 GPUs (communication ms per step; NIC MB per machine):")
    print(machines_table(machines))
    print("hierarchical / flat NIC bytes:", {H: round(v, 3) for H, v in
                                              machines["hier_over_flat_bytes"].items()})
    if machines["measured_4x2"]:
        print("bytes per rank across machines, model vs netem_hier.json:",
              machines["measured_4x2"])
    print(f"cost_model.py: {res / 'netem_cost_model.json'}, {path}")
    return 0


def hier_measured(res):
    """The byte model against hier_bench.py's record (``netem_hier.json``), if there is
    one: bytes per rank crossing machines, predicted and measured (the machine links)."""
    path = Path(res) / "netem_hier.json"
    if not path.exists():
        return None
    out = {}
    for r in json.loads(path.read_text()):
        m = {"mvsm_flat": "flat", "mvsm_hier": "hier", "fp32_flat": "fp32",
             "fp32_hier": "fp32"}.get(r["method"])
        if m is None or "cross_bytes_per_rank" not in r:
            continue
        H, k = r["machines"], r["k"]
        out[r["method"]] = {"H": H, "k": k,
                            "predicted": machine_cross_bytes(m, H, k, r["d"]) / k,
                            "measured": r["cross_bytes_per_rank"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
