"""The training wrapper on this launcher: every check of tests/test_optim.py that needs
real ranks, in one job per (launcher, n) so the start-up cost is paid once.

argv: transport ("mpi" | "horovod"), checkpoint directory.  Saves per rank:
- ``<method>-<schedule>-traj``: flat parameters after each of STEPS steps (and the final
  momenta ``...-mom-<name>``), for the oracle comparison;
- ``dt-*``: fp16/bf16 parameters, two param groups with their own lr / weight decay;
- ``ck-*``: the same runs stopped at RESUME_AT, saved, reloaded into fresh objects;
- ``bc-*`` broadcast_state, ``ls-*`` lockstep, ``byz-*`` one Byzantine rank, ``nan-*``
  a NaN gradient on the last rank, ``shape-*`` ranks with different parameters.
"""
import os
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
T0 = time.time()

from harness import save_result  # noqa: E402

transport_name, ckpt_dir = sys.argv[1], sys.argv[2]
if transport_name == "horovod":
    import horovod.torch as hvd
    hvd.init()

import signcomm  # noqa: E402
from optim_oracle import SPECS, batch, eval_loss, flat, init_params, loss_fn  # noqa: E402
from signcomm.comm import RankMismatchError, RemoteRankError  # noqa: E402

STEPS, RESUME_AT, BUCKET, SEED, LR = 20, 7, 30, 5, 0.05
METHODS = ["signsgd-mv", "signum-mv", "sto-signsgd", "mv-sto-signsgd-sim", "mvsm-v1", "mvsm-v2"]
SCHEDULES = ["allgather", "sharded", "allreduce"]
DT = {"w1": "fp16", "w2": "bf16"}

out = {}


def model_of(init_seed, dtypes=None):
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in init_params(init_seed, dtypes).items()})


def ordered(model):
    """(name, parameter) in the problem's order (ParameterDict iterates sorted by name)."""
    return [(name, model[name]) for name, _ in SPECS]


def groups_of(model, grouped):
    if not grouped:
        return ordered(model)
    return [{"params": [(k, model[k]) for k in ("w1", "b1")], "lr": 0.02, "weight_decay": 0.1},
            {"params": [(k, model[k]) for k in ("w2", "b2", "unused")], "lr": LR}]


def backward(model, rank, step, hetero=True):
    for p in model.parameters():
        p.grad = None
    x, y = batch(rank, step, hetero)
    loss_fn(model, x, y).backward()


def make_opt(model, method, grouped, **options):
    return signcomm.create_optimizer(method, groups_of(model, grouped), lr=LR, seed=SEED,
                                     bucket_elements=BUCKET, **options)


def train(method, *, schedule="allgather", dtypes=None, grouped=False, resume_at=None,
          tag=None, hetero=True, **options):
    model = model_of(1, dtypes)
    opt = make_opt(model, method, grouped, schedule=schedule, **options)
    rank = opt.transport.rank
    traj = []
    for step in range(STEPS):
        if step == resume_at:  # save, throw everything away, load into fresh objects
            opt_path = os.path.join(ckpt_dir, f"{tag}-opt-rank{rank}.pt")
            model_path = os.path.join(ckpt_dir, f"{tag}-model-rank{rank}.pt")
            torch.save(opt.state_dict(), opt_path)
            torch.save(model.state_dict(), model_path)
            del model, opt
            model = model_of(1234, dtypes)  # other values: the load must overwrite them
            opt = make_opt(model, method, grouped, schedule=schedule, **options)
            model.load_state_dict(torch.load(model_path, weights_only=True))
            opt.load_state_dict(torch.load(opt_path, weights_only=True))
        backward(model, rank, step, hetero)
        opt.step()
        traj.append(flat(model))
    return np.stack(traj), model, opt


def save_run(tag, traj, model, opt):
    out[f"{tag}-traj"] = traj
    for name, p in model.named_parameters():
        mom = opt.state.get(p, {}).get("momentum_buffer")
        if mom is not None:
            out[f"{tag}-mom-{name}"] = mom.numpy()
            out[f"{tag}-momdtype-{name}"] = str(mom.dtype)


def phase(name):
    if os.environ.get("OPTIM_TRAIN_VERBOSE"):
        print(f"[{time.time() - T0:7.2f}s] {name}", file=sys.stderr, flush=True)


def error_text(exc):
    return f"{type(exc).__name__}: {exc}"


phase("imports done")
phase("# 1.")
# 1. every method x schedule against the oracle (lockstep checked every step: no false alarms)
transport = None
for method in METHODS:
    for schedule in SCHEDULES:
        traj, model, opt = train(method, schedule=schedule, lockstep_every=1)
        save_run(f"{method}-{schedule}", traj, model, opt)
        transport = opt.transport
        out[f"{method}-{schedule}-stats"] = [opt.stats[k] for k in
                                             ("compress_s", "comm_s", "vote_s", "update_s", "bytes_sent", "bytes_received")]
rank, n = transport.rank, transport.size
out["transport"] = transport.name

phase("# 2.")
# 2. fp16/bf16 parameters and two param groups with their own lr and weight decay
for method in ("signum-mv", "mvsm-v2"):
    save_run(f"dt-{method}", *train(method, dtypes=DT, grouped=True, schedule="sharded"))

phase("# 3.")
# 3. checkpoint at RESUME_AT and resume, in fresh objects, from weights_only loads
for method, dtypes, grouped in (("mvsm-v2", DT, True), ("signum-mv", None, False), ("mvsm-v1", DT, True)):
    save_run(f"ck-{method}", *train(method, dtypes=dtypes, grouped=grouped, schedule="sharded",
                                    resume_at=RESUME_AT, tag=f"ck-{method}"))

phase("# 4.")
# 4. broadcast_state: different parameters and momenta per rank become rank 0's
model = model_of(100 + rank)
opt = signcomm.create_optimizer("mvsm-v1", model.parameters(), lr=LR)
for step in range(2):  # momenta differ per rank (own data)
    backward(model, rank, step)
    opt.step()
with torch.no_grad():
    for p in model.parameters():
        p.add_(float(rank))
out["bc-before"] = flat(model)
out["bc-mom-before"] = opt.state[model["w1"]]["momentum_buffer"].numpy().copy()
signcomm.broadcast_state(model, opt)
out["bc-after"] = flat(model)
out["bc-mom-after"] = opt.state[model["w1"]]["momentum_buffer"].numpy().copy()
signcomm.check_lockstep(model)  # must not raise now

phase("# 5.")
# 5. lockstep: the last rank's parameters are nudged by one ulp after step 3; the check
#    every 3 steps must raise at step index 5 (after the 6th step) on every rank
if n > 1:
    model = model_of(1)
    opt = signcomm.create_optimizer("mvsm-v1", ordered(model), lr=LR, lockstep_every=3)
    out["ls-error"], out["ls-at"] = "no error", -1
    for step in range(12):
        backward(model, rank, step)
        try:
            opt.step()
        except signcomm.LockstepError as exc:
            out["ls-error"], out["ls-at"] = error_text(exc), step
            break
        if step == 3 and rank == n - 1:
            with torch.no_grad():
                w = model["w2"].view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(np.inf))

phase("# 6.")
# 6. one Byzantine rank (rank 0 sends the opposite bits), homogeneous data
if n >= 3:
    traj, model, opt = train("signsgd-mv", byzantine=(rank == 0), hetero=False, lockstep_every=5)
    save_run("byz", traj, model, opt)
    out["byz-eval"] = [eval_loss(init_params(1)), eval_loss(model)]

phase("# 7.")
# 7. a NaN gradient on the last rank at step 3: error on every rank, nothing updated
model = model_of(1)
opt = signcomm.create_optimizer("mvsm-v1", ordered(model), lr=LR, seed=SEED)
for step in range(3):
    backward(model, rank, step)
    opt.step()
backward(model, rank, 3)
if rank == n - 1:
    model["w2"].grad[1, 2] = float("nan")
params_before = flat(model)
moms_before = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state]
try:
    opt.step()
    out["nan-error"] = "no error"
except (RemoteRankError, RankMismatchError) as exc:
    out["nan-error"] = error_text(exc)
out["nan-params-unchanged"] = np.array_equal(params_before.view(np.uint32), flat(model).view(np.uint32))
moms_after = [opt.state[p]["momentum_buffer"] for p in model.parameters() if p in opt.state]
out["nan-moms-unchanged"] = len(moms_after) == len(moms_before) and all(
    torch.equal(a, b) for a, b in zip(moms_before, moms_after))
out["nan-step-counter"] = opt.state_dict()["signcomm"]["step"]
backward(model, rank, 3)  # the job goes on with finite gradients
opt.step()
out["nan-recovered"] = flat(model)

phase("# 8.")
# 8. ranks whose parameters differ: a clear error on every rank, nothing updated, no hang
if n > 1:
    last = rank == n - 1
    cases = {
        "numel": [(7, 5), (3, 8) if last else (3, 7)],
        "transposed": [(7, 5), (7, 3) if last else (3, 7)],
        "count": [(7, 5), (3, 7)] + ([(2,)] if last else []),
        "dtype": [(7, 5), (3, 7)],
    }
    for case, shapes in cases.items():
        dtype = torch.float64 if (case == "dtype" and last) else torch.float32
        params = [torch.nn.Parameter(torch.full(s, 0.25, dtype=dtype)) for s in shapes]
        opt = signcomm.create_optimizer("signum-mv", params, lr=LR)
        for p in params:
            p.grad = torch.ones_like(p)
        try:
            opt.step()
            out[f"shape-{case}"] = "no error"
        except (RankMismatchError, RemoteRankError) as exc:
            out[f"shape-{case}"] = error_text(exc)
        out[f"shape-{case}-unchanged"] = all(bool((p == 0.25).all()) for p in params)
        try:
            signcomm.broadcast_state(params)
            out[f"shape-bc-{case}"] = "no error"
        except (RankMismatchError, RemoteRankError) as exc:
            out[f"shape-bc-{case}"] = error_text(exc)

out["horovod-imported"] = "horovod" in sys.modules
save_result(rank=rank, size=n, **out)
