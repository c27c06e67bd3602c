"""An ordinary Horovod training script with signcomm's compressors, then the functional
allreduce and bad input.  Run under ``horovodrun -np N`` or ``mpirun -np N`` (N >= 3).

Usage: hvd_compressors.py STEPS [CONFIG,CONFIG,...]   (default: all configurations)

Part 1 trains one small MLP per configuration on sklearn's digits (every op/option of
issue 5: Average, Sum, predivide, backward_passes_per_step, num_groups, groups, a process
set, fixed R, tie="zero", the int64 wire, a tensor split into many messages, and a model
whose hooks fire in a different order on odd ranks).  The configurations step in
lockstep so each training step is one Horovod cycle for all of them.  Each rank records,
per step and parameter, the gradient its compressor was given and the decompressed
result, for the test's single-process oracle.

Part 2 calls ``hvd.allreduce(t, compression=c)`` on odd shapes and dtypes; part 3 feeds
bad input and records the error every rank raised.
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import horovod.torch as hvd
import compressors as C
from harness import save_result
from mlp import MLP

PS_RANKS = [0, 2]
T0 = time.time()
ps = hvd.ProcessSet(PS_RANKS)
hvd.init(process_sets=[ps])
torch.set_num_threads(1)
n, rank = hvd.size(), hvd.rank()
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ONLY = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
BATCH = 32
out = {}

X, Y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
Y = torch.tensor(Y, dtype=torch.int64)


def batch(r, size, t, micro=0):
    """Rank r's minibatch at step t: its own shard (r::size) of the digits."""
    idx = np.arange(len(X))[r::size]
    pick = np.random.default_rng([r, t, micro]).choice(idx, BATCH, replace=False)
    return X[pick], Y[pick]


class TwoBranch(torch.nn.Module):
    """Two same-shaped branches; building branch b first (odd ranks) flips the order in
    which autograd reaches them, so hooks fire in a different order on different ranks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Linear(64, 16)
        self.b = torch.nn.Linear(64, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        if rank % 2:
            hb = torch.relu(self.b(x))
            ha = torch.relu(self.a(x))
        else:
            ha = torch.relu(self.a(x))
            hb = torch.relu(self.b(x))
        return self.head(ha + hb)


def recording(cls):
    """``cls`` plus a record of each compress input and decompress output, by name."""

    class Recording(cls):
        def __init__(self, names, **kw):
            super().__init__(**kw)
            self.names = names
            self.log = {}
            self.order = []

        def _name(self, tensor):
            for nm, p in self.names:
                if p.grad is tensor:
                    return nm
            raise AssertionError("compress got a tensor that is no parameter's grad")

        def compress(self, tensor):
            w, ctx = super().compress(tensor)
            nm = self._name(tensor)
            rec = self.log.setdefault(nm, dict(g=[], o=[], k=[], step=[]))
            rec["g"].append(tensor.detach().float().numpy().ravel().copy())
            rec["k"].append(ctx.k)
            rec["step"].append(ctx.step)
            self.order.append(nm)
            ctx.name = nm
            return w, ctx

        def decompress(self, tensor, ctx):
            res = super().decompress(tensor, ctx)
            self.log[ctx.name]["o"].append(res.numpy().ravel().astype(np.int8))
            return res

    Recording.__name__ = cls.__name__
    return Recording


# --- part 1: training ---------------------------------------------------------------
# S1Compressor's default common R (issue 14) is one bound for all ranks, at least each
# rank's own max |g|, so E[o] = mean g / R is smaller and noisier than under the old
# per-rank R.  With momentum 0.9 the s1 configurations at lr 0.01 then ended at 0.57-0.63
# of the initial loss after 200 steps (0.6 is the test's bar; 1.8x at lr 0.013: the edge
# of stability), at lr 0.006 at 0.17-0.24: they train at 0.006.
S1_LR = 0.006
# name, compressor class, compressor options, DistributedOptimizer options, lr, momentum,
# model, backward passes per step
CONFIGS = [
    ("sign_avg", C.SignCompressor, {}, {}, 0.01, 0.0, MLP, 1),
    ("sr_sum", C.SRCompressor, dict(seed=1), dict(op=hvd.Sum), 0.01, 0.0, MLP, 1),
    ("s1_predivide", C.S1Compressor, dict(seed=2), dict(gradient_predivide_factor=2.0),
     S1_LR, 0.9, MLP, 1),
    ("sign_bpps_zero", C.SignCompressor, dict(seed=3, tie="zero"),
     {}, 0.01, 0.0, MLP, 2),
    ("sr_fixedR_numgroups", C.SRCompressor, dict(seed=4, R=0.05), dict(num_groups=2),
     0.01, 0.9, MLP, 1),
    ("s1_groups_sum", C.S1Compressor, dict(seed=5), dict(groups="list", op=hvd.Sum),
     S1_LR, 0.9, MLP, 1),
    ("sign_int64_split", C.SignCompressor, dict(seed=6, wire="int64", max_message_words=64),
     dict(op=hvd.Sum), 0.01, 0.0, MLP, 1),
    ("sr_split", C.SRCompressor, dict(seed=7, max_message_words=40), {}, 0.01, 0.0, MLP, 1),
    ("sr_process_set", C.SRCompressor, dict(seed=8, process_set=ps), dict(process_set=ps),
     0.01, 0.0, MLP, 1),
    ("s1_hook_order", C.S1Compressor, dict(seed=9), {}, S1_LR, 0.9, TwoBranch, 1),
]
assert ONLY is None or ONLY <= {c[0] for c in CONFIGS}, ONLY
runs = []
for name, cls, copts, oopts, lr, mom, model_cls, bpps in CONFIGS:
    if ONLY is not None and name not in ONLY:
        continue
    if "process_set" in oopts and not ps.included():
        continue
    model = model_cls()
    if "process_set" not in oopts:   # (the process-set model starts from the same seed)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    named = [(f"{name}.{k}", v) for k, v in model.named_parameters()]
    comp = recording(cls)(named, **copts)
    oopts = dict(oopts)
    if oopts.get("groups") == "list":
        params = [p for _, p in model.named_parameters()]
        oopts["groups"] = [params[:2], params[2:]]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=mom),
                                   named_parameters=named, compression=comp,
                                   backward_passes_per_step=bpps, **oopts)
    size, me = (ps.size(), ps.rank()) if "process_set" in oopts else (n, rank)
    with torch.no_grad():
        loss0 = F.cross_entropy(model(X), Y).item()
    runs.append(dict(name=name, model=model, opt=opt, comp=comp, bpps=bpps, size=size,
                     me=me, loss0=loss0, group=list(PS_RANKS) if size != n else list(range(n))))

T1 = time.time()
for t in range(STEPS):
    for r in runs:
        r["opt"].zero_grad()
        for micro in range(r["bpps"]):
            xb, yb = batch(r["me"], r["size"], t, micro)
            F.cross_entropy(r["model"](xb), yb).backward()
    for r in runs:
        r["opt"].step()

T2 = time.time()
for r in runs:
    nm, comp = r["name"], r["comp"]
    with torch.no_grad():
        loss1 = F.cross_entropy(r["model"](X), Y).item()
    out[f"{nm}|loss"] = np.array([r["loss0"], loss1])
    out[f"{nm}|params"] = torch.cat([p.detach().reshape(-1) for p in r["model"].parameters()]).numpy()
    out[f"{nm}|group"] = np.array(r["group"])
    out[f"{nm}|stats"] = np.array([comp.stats[k] for k in ("tensors", "coordinates", "messages",
                                                           "wire_bytes", "clamped")])
    out[f"{nm}|order"] = np.array(comp.order[:3 * len(comp.log)])
    out[f"{nm}|spec"] = np.array([comp.contribute, comp.vote, comp.tie, str(comp.R),
                                  str(comp.seed), comp.wire_used])
    for pname, rec in comp.log.items():
        for key in ("g", "o", "k", "step"):
            out[f"{nm}|{pname}|{key}"] = np.array(rec[key])

# --- part 2: the functional API, odd shapes and dtypes --------------------------------
SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (1000,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = {"sign": C.SignCompressor, "sr": C.SRCompressor, "s1": C.S1Compressor}
OPS = [("average", hvd.Average, 1.0, 1.0), ("sum", hvd.Sum, 1.0, 1.0),
       ("average_pre3", hvd.Average, 1 / 3, 3.0), ("sum_pre7", hvd.Sum, 1 / 7, 7.0)]
case = 0
for si, shape in enumerate(SHAPES):
    for di, dtype in enumerate(DTYPES):
        kind = list(KINDS)[(si + di) % 3]
        opname, op, pre, post = OPS[(si * 3 + di) % 4]
        rng = np.random.default_rng([rank, case])
        g = rng.standard_normal(shape) * (rng.random(shape) > 0.1)   # some exact zeros
        t = torch.tensor(g).to(dtype)
        comp = KINDS[kind](seed=100 + case)
        res = hvd.allreduce(t, name=f"fn{case}", op=op, compression=comp,
                            prescale_factor=pre, postscale_factor=post)
        tag = f"fn|{case}"
        out[f"{tag}|g"] = t.float().numpy()
        out[f"{tag}|o"] = res.float().numpy()
        out[f"{tag}|meta"] = np.array([kind, opname, str(dtype), str(res.dtype),
                                       str(tuple(res.shape)), str(tuple(t.shape))])
        case += 1

# integer tensors pass through: the plain Horovod sum
ti = torch.arange(5, dtype=torch.int64) + rank
out["int|o"] = hvd.allreduce(ti, name="int", op=hvd.Sum, compression=C.SignCompressor()).numpy()
out["int|dtype"] = np.array(str(hvd.allreduce(ti, name="int2", op=hvd.Sum,
                                              compression=C.SignCompressor()).dtype))

# the worst case for exactness: every count is n (all gradients positive), odd scalings
worst = []
for i, (op, pre, post) in enumerate([(hvd.Average, 1 / 3, 3.0), (hvd.Average, 1 / 7, 7.0),
                                     (hvd.Sum, 0.1, 10.0), (hvd.Average, 1.0, 1.0)]):
    t = torch.rand(20000, dtype=torch.float64) + 0.5
    res = hvd.allreduce(t, name=f"worst{i}", op=op, compression=C.SignCompressor(),
                        prescale_factor=pre, postscale_factor=post)
    worst.append(bool((res == 1).all()))
out["worst|ok"] = np.array(worst)

# --- part 3: bad input: every rank must raise the same clear error, none may hang ----


def attempt(tag, fn):
    try:
        fn()
        out[f"err|{tag}"] = np.array("no error")
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out[f"err|{tag}"] = np.array(f"{type(e).__name__}: {e}")


def nan_step():
    model = MLP()
    named = [(f"nan.{k}", v) for k, v in model.named_parameters()]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=named, compression=C.SignCompressor())
    xb, yb = batch(rank, n, 0)
    if rank == n - 1:
        xb = xb.clone()
        xb[0, 5] = float("nan")
    F.cross_entropy(model(xb), yb).backward()
    opt.step()


attempt("nan", nan_step)


def split_hook_order_step():
    """Same-sized tensors split into several messages, compressed in another order on odd
    ranks: the extra messages pair up wrongly, which the nonce check must catch."""
    model = TwoBranch()
    named = [(f"sho.{k}", v) for k, v in model.named_parameters()]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=named,
                                   compression=C.SignCompressor(max_message_words=40,
                                                                name="sho"))
    xb, yb = batch(rank, n, 0)
    F.cross_entropy(model(xb), yb).backward()
    opt.step()


attempt("split_hook_order", split_hook_order_step)
attempt("size_same_words", lambda: hvd.allreduce(
    torch.randn(10 + (rank == 1)), name="mm1", compression=C.SignCompressor()))
attempt("size_other_words", lambda: hvd.allreduce(
    torch.randn(100 if rank == 0 else 1000), name="mm2", compression=C.SignCompressor()))
attempt("op_min", lambda: hvd.allreduce(torch.randn(50), name="min", op=hvd.Min,
                                        compression=C.SRCompressor()))
attempt("int64_average", lambda: hvd.allreduce(torch.randn(50), name="i64avg",
                                               compression=C.SignCompressor(wire="int64")))
if ps.included():
    attempt("wrong_group", lambda: hvd.allreduce(torch.randn(50), name="grp", process_set=ps,
                                                 compression=C.SignCompressor()))
attempt("after_errors", lambda: hvd.allreduce(torch.randn(50), name="after",
                                              compression=C.SignCompressor()))
out["times"] = np.array([T1 - T0, T2 - T1, time.time() - T2])
if rank == 0:
    print("setup %.1fs, training %.1fs, functional+errors %.1fs" % tuple(out["times"]), flush=True)
out["rank"] = np.array(rank)
out["size"] = np.array(n)
save_result(**out)
