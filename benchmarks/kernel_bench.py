"""Speed of the one-bit kernels next to a memory copy of the same input bytes.

    python benchmarks/kernel_bench.py                      # d = 25.6M (ResNet-50), n = 8
    python benchmarks/kernel_bench.py --d 1000000 --n 16 --repeat 9 --json out.json
    python benchmarks/kernel_bench.py --backend torch      # the pure-torch backend, CPU
    python benchmarks/kernel_bench.py --device cuda        # torch backend on the GPU
    python benchmarks/kernel_bench.py --device cuda --backend kernels   # CuPy reference path

Each kernel is timed next to a baseline measured in the same run, interleaved with it
(baseline, kernel, baseline, kernel, ...) so that both see the same machine load:

- sign+pack and S_R+pack: a copy of the float32 input into a preallocated buffer
  (4d bytes read, 4d written);
- the votes and the counts: a copy of the gathered packed rows (n * d / 8 bytes) into a
  preallocated buffer.

Reported: the median over ``--repeat`` runs of each, after one warm-up call (numba
compilation and first-touch page faults are excluded), and their ratio.  Absolute times
drift on a shared machine; the ratio is the figure to compare.  Targets (on a 2-core
CPU): sign+pack <= 1.5x, S_R+pack <= 4x, v1 vote <= 2x.

The gathered rows are uniform random bits: what S_R sends when |v| << R, and the worst
case for ties (at n = 8, 27% of coordinates tie, so nearly every 64-coordinate word has a
tie and draws its word of coins from the shared stream: one SplitMix64 per 64
coordinates).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

import common  # noqa: F401  (puts the checkout on sys.path)
from common import Method, interleave, random_packed
from signcomm import kernels as K
from signcomm.kernels import rng

SEED = 20240607
TARGETS = {"sign_pack": 1.5, "stochastic_sign_pack": 4.0, "vote_v1": 2.0}


def measure(kernel, baseline, repeat, device):
    """Median seconds of kernel and baseline, interleaved, after one warm-up each."""
    sync = None
    if device == "cuda":
        import torch
        sync = torch.cuda.synchronize
    b, k = interleave([Method(lambda i: baseline()), Method(lambda i: kernel())], repeat,
                      warmup=1, sync=sync)
    return k.median, b.median


def inputs(d, n, device, backend):
    gen = np.random.default_rng(SEED)
    x = gen.standard_normal(d, dtype=np.float32)
    gathered = random_packed(d, gen, rows=n)
    if backend == "torch":
        import torch
        return torch, torch.from_numpy(x).to(device), torch.from_numpy(gathered).to(device)
    if device == "cuda":
        import cupy as cp
        return cp, cp.asarray(x), cp.asarray(gathered)
    return np, x, gathered


def benchmarks(d, n, device, backend="kernels"):
    """(name, baseline name, kernel thunk, baseline thunk) for each measurement.
    ``backend``: "kernels" (signcomm.kernels: numba on CPU, the CuPy reference on GPU)
    or "torch" (signcomm.backends' torch backend, on CPU or CUDA tensors)."""
    xp, x, gathered = inputs(d, n, device, backend)
    xbuf = xp.empty_like(x)
    gbuf = xp.empty_like(gathered)
    r = float(abs(x).max()) if d else 1.0
    rank_key = rng.key64(SEED, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 0), 1)
    zero_key = rng.key64(SEED, rng.stream_id(rng.Purpose.ZERO_COIN, 0), 1)
    tie_key = rng.key64(SEED, rng.stream_id(rng.Purpose.TIE_COIN), 1)
    s1_key = rng.key64(SEED, rng.stream_id(rng.Purpose.S1), 1)

    def copy_x():
        xbuf[...] = x

    def copy_g():
        gbuf[...] = gathered

    if backend == "torch":
        from signcomm.backends import get_backend
        from signcomm.kernels import torch_ops
        b = get_backend("torch")
        seg = np.array([d], np.int64)
        counts = torch_ops.counts(gathered, d)
        v1, v1z, v2 = K.VoteRule("v1"), K.VoteRule("v1", "zero"), K.VoteRule("v2")
        return [
            ("sign_pack", "copy float32 input", lambda: b.sign_pack(x, zero_key, 0), copy_x),
            ("stochastic_sign_pack", "copy float32 input",
             lambda: b.sr_pack(x, [r], seg, rank_key, 0), copy_x),
            ("vote_v1", "copy gathered bits", lambda: b.vote(gathered, d, v1, tie_key, 0), copy_g),
            ("vote_v1_tie_zero", "copy gathered bits",
             lambda: b.vote(gathered, d, v1z, None, 0), copy_g),
            ("vote_v2", "copy gathered bits", lambda: b.vote(gathered, d, v2, s1_key, 0), copy_g),
            ("vote_counts", "copy gathered bits", lambda: torch_ops.counts(gathered, d), copy_g),
            ("vote_from_counts_v2", "copy gathered bits",
             lambda: b.decide(counts, n, v2, s1_key, 0), copy_g),
        ]
    counts = K.vote_counts(gathered, d)
    return [
        ("sign_pack", "copy float32 input", lambda: K.pack_signs(x, zero_key=zero_key), copy_x),
        ("stochastic_sign_pack", "copy float32 input",
         lambda: K.stochastic_sign_pack(x, r, rank_key), copy_x),
        ("vote_v1", "copy gathered bits",
         lambda: K.majority_vote(gathered, d, variant="v1", tie="coin", key=tie_key), copy_g),
        ("vote_v1_tie_zero", "copy gathered bits",
         lambda: K.majority_vote(gathered, d, variant="v1", tie="zero"), copy_g),
        ("vote_v2", "copy gathered bits",
         lambda: K.majority_vote(gathered, d, variant="v2", key=s1_key), copy_g),
        ("vote_counts", "copy gathered bits", lambda: K.vote_counts(gathered, d), copy_g),
        ("vote_from_counts_v2", "copy gathered bits",
         lambda: K.vote_from_counts(counts, n, variant="v2", key=s1_key), copy_g),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=25_600_000, help="coordinates (default 25.6M)")
    ap.add_argument("--n", type=int, default=8, help="ranks whose bits are voted (default 8)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", choices=("kernels", "torch"), default=None,
                    help="kernels: numba on CPU, CuPy reference on CUDA; torch: the torch "
                         "backend (default: kernels on CPU, torch on CUDA)")
    ap.add_argument("--only", default="", help="comma-separated names to run (default all)")
    ap.add_argument("--json", metavar="PATH", help="write one record per measurement")
    args = ap.parse_args(argv)
    if args.d < 0 or args.n < 1 or args.repeat < 1:
        ap.error("need d >= 0, n >= 1, repeat >= 1")
    backend = args.backend or ("torch" if args.device == "cuda" else "kernels")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA GPU visible to torch")
        if backend == "kernels" and not K.cupy_available():
            ap.error("--device cuda --backend kernels needs CuPy (pip install -e .[gpu])")

    threads = None
    if args.device == "cpu" and backend == "kernels":
        import numba
        threads = numba.get_num_threads()
    only = {s for s in args.only.split(",") if s}
    records = []
    gpu = ""
    if args.device == "cuda":
        import torch
        gpu = f" gpu={torch.cuda.get_device_name()}"
    print(f"d={args.d} n={args.n} repeat={args.repeat} device={args.device} backend={backend}{gpu}"
          + (f" numba_threads={threads}" if threads else "") + f" cpus={os.cpu_count()}")
    print(f"{'kernel':<22} {'seconds':>10} {'baseline':<20} {'seconds':>10} {'ratio':>7}  target")
    for name, bname, kernel, baseline in benchmarks(args.d, args.n, args.device, backend):
        if only and name not in only:
            continue
        tk, tb = measure(kernel, baseline, args.repeat, args.device)
        ratio = tk / tb if tb > 0 else float("nan")
        target = TARGETS.get(name) if (backend == "kernels" and args.device == "cpu") else None
        verdict = ("" if target is None
                   else f"<= {target:g}x " + ("ok" if ratio <= target else "MISSED"))
        print(f"{name:<22} {tk:>10.5f} {bname:<20} {tb:>10.5f} {ratio:>6.2f}x  {verdict}")
        records.append({"name": name, "n": args.n, "d": args.d, "seconds": tk,
                        "baseline": bname, "baseline_seconds": tb, "ratio": ratio,
                        "target_ratio": target, "repeat": args.repeat, "device": args.device,
                        "backend": backend,
                        "threads": threads, "machine": platform.machine(),
                        "cpus": os.cpu_count()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return records


if __name__ == "__main__":
    main()
