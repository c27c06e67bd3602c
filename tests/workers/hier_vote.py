"""The hierarchical vote on real MPI ranks (tests/test_hierarchy.py).

For each layout (H machines x k ranks) of this world size and each configuration, every
rank runs ``STEPS`` steps of the hierarchical MVSM on its own gradients, and ranks
0 .. H-1 then run the same method flat, on a sub-communicator of H ranks, rank m fed
machine m's mean gradient (``hier_problem.machine_grads``).  On 4 ranks also: k = 1
against the flat vote of the 4 ranks, hierarchy="host", the refusals (uneven machines,
ranks that disagree), and checkpoints (resume exact; another layout refused)."""
import copy
import io
import sys

import numpy as np
import torch
from mpi4py import MPI

import hier_problem as P
import signcomm
from harness import save_result
from signcomm.comm import get_transport
from signcomm.hierarchy import hierarchy_from_keys

torch.set_num_threads(1)
world = MPI.COMM_WORLD
rank, n = world.Get_rank(), world.Get_size()
CORE = [(m, s, {}) for m in ("mvsm-v1", "mvsm-v2") for s in ("allgather", "sharded", "allreduce")]
TIE_ZERO = ("mvsm-v1", "sharded", {"tie": "zero"})   # H even: ties, the sharded mask
CONFIGS = CORE + [("signum-mv", "sharded", {}), TIE_ZERO,
                  ("sto-signsgd", "allgather", {"R": "local"})]
CONFIGS_OF = {(2, 2): CONFIGS, (3, 2): CORE, (2, 3): CORE + [TIE_ZERO]}
LAYOUTS = {4: [(2, 2)], 6: [(3, 2), (2, 3)]}[n]
out = {}


def tag_of(method, schedule, extra):
    return "-".join([method, schedule] + [f"{k}={v}" for k, v in extra.items()])


def train(method, schedule, extra, grad_of, **options):
    return P.train(method, schedule, grad_of, **extra, **options)


def failure(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


for H, k in LAYOUTS:
    sub = world.Split(0 if rank < H else MPI.UNDEFINED, rank)
    flat_transport = get_transport("mpi", comm=sub) if rank < H else None
    for method, schedule, extra in CONFIGS_OF[H, k]:
        tag = f"{H}x{k}-{tag_of(method, schedule, extra)}"
        traj, opt, _ = train(method, schedule, extra,
                             lambda p, t: P.rank_grads(p, rank, t), ranks_per_node=k)
        out[f"hier-{tag}"] = traj
        out[f"layout-{tag}"] = [opt.hierarchy.machines, opt.hierarchy.k,
                                opt.hierarchy.machine, opt.hierarchy.local_rank]
        s = opt.stats
        assert s["reduce_s"] >= 0 and s["step"] == P.STEPS - 1
        out[f"bytes-{tag}"] = [s["cross_bytes_sent"], s["cross_bytes_received"],
                               s["local_bytes_sent"], s["local_bytes_received"]]
        out[f"local-ops-{tag}"] = ",".join(sorted({rec.op for rec in opt.transport.ledger.records
                                                   if rec.kind == "local"}))
        if rank < H:
            traj, _, _ = train(method, schedule, extra,
                               lambda p, t: P.machine_grads(p, rank, t, k),
                               transport=flat_transport)
            out[f"flat-{tag}"] = traj

if n == 4:
    # k = 1: the hierarchical vote of 4 one-rank machines is the flat vote of 4 ranks
    for method, schedule in (("mvsm-v1", "sharded"), ("mvsm-v2", "allreduce")):
        own = (lambda p, t: P.rank_grads(p, rank, t))
        out[f"k1-{method}-{schedule}"] = train(method, schedule, {}, own, ranks_per_node=1)[0]
        out[f"world-{method}-{schedule}"] = train(method, schedule, {}, own)[0]
    # the host: every rank of this job shares one machine (H = 1, k = 4)
    traj, opt, _ = train("mvsm-v1", "allgather", {}, lambda p, t: P.rank_grads(p, rank, t),
                         hierarchy="host")
    out["host-traj"] = traj
    out["host-layout"] = [opt.hierarchy.machines, opt.hierarchy.k]

    # refusals, on every rank
    params = list(P.init_params().values())
    out["err-uneven-k"] = failure(lambda: signcomm.MVSM(params, lr=0.1, transport="mpi",
                                                        ranks_per_node=3))
    t = get_transport("mpi")
    out["err-uneven-host"] = failure(lambda: hierarchy_from_keys(t, [0, 0, 0, 3], "host"))
    out["err-disagree"] = failure(lambda: signcomm.MVSM(
        params, lr=0.1, transport="mpi", ranks_per_node=1 if rank == 0 else 2))
    out["err-both"] = failure(lambda: signcomm.MVSM(params, lr=0.1, transport="mpi",
                                                    hierarchy="host", ranks_per_node=2))
    out["err-overlap"] = failure(lambda: signcomm.MVSM(params, lr=0.1, transport="mpi",
                                                       ranks_per_node=2, overlap=True))
    # a rank's NaN: its own error, RemoteRankError elsewhere, nothing updated
    ps = P.init_params()
    nan_opt = signcomm.MVSM(list(ps.values()), lr=0.1, transport="mpi", ranks_per_node=2)
    for name, p in ps.items():
        p.grad = P.rank_grads(ps, rank, 0)[name]
    ps["a"].grad[3] = float("nan") if rank == 3 else ps["a"].grad[3]
    out["err-nan"] = failure(nan_opt.step)
    out["nan-untouched"] = np.array_equal(P.flat(ps), P.flat(P.init_params()))

    # checkpoints: stop after 2 steps, resume, compare with the run that went on
    own = (lambda p, t: P.rank_grads(p, rank, t))
    full, _, _ = train("mvsm-v1", "sharded", {}, own, steps=5, ranks_per_node=2)
    _, opt, params_at = train("mvsm-v1", "sharded", {}, own, steps=2, ranks_per_node=2)
    out["bcast"] = failure(lambda: signcomm.broadcast_state(list(params_at.values()), opt))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed, _, _ = train("mvsm-v1", "sharded", {}, own, steps=3, params=params_at,
                          opt_state=state, ranks_per_node=2)
    out["ckpt-full"], out["ckpt-resumed"] = full[2:], resumed
    out["ckpt-has-shards"] = all("momentum_shard" in s and "momentum_buffer" not in s
                                 for s in state["state"].values())
    out["ckpt-layout"] = str(state["signcomm"]["hierarchy"])
    out["err-ckpt-k1"] = failure(lambda: train("mvsm-v1", "sharded", {}, own, steps=1,
                                               opt_state=copy.deepcopy(state), ranks_per_node=1))
    out["err-ckpt-flat"] = failure(lambda: train("mvsm-v1", "sharded", {}, own, steps=1,
                                                 opt_state=copy.deepcopy(state)))
    # ranks 0 and 1 swap files (local ranks 0 and 1 of machine 0): theirs do not fit
    mine = world.sendrecv(buf.getvalue(), dest=rank ^ 1, source=rank ^ 1) if rank < 2 \
        else buf.getvalue()
    out["err-ckpt-swapped"] = failure(lambda: train(
        "mvsm-v1", "sharded", {}, own, steps=1,
        opt_state=torch.load(io.BytesIO(mine), weights_only=True), ranks_per_node=2))

save_result(**out)
sys.stdout.flush()
