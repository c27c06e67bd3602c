"""What real DDP does around the hook, on 2 gloo ranks: bucket rebuild, no_sync()
accumulation, checkpoint resume, a NaN on one rank, ranks that disagree, a process
group without the collectives, transport=None.  Saves per rank (see tests/test_ddp.py)."""
import copy
import io
import pickle

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_common import LR, Awkward, batch, flat, init, loss_of, oracle, pair
from harness import save_result

import signcomm.ddp  # noqa: E402
from signcomm.comm import get_transport  # noqa: E402

rank, n = init()
out = {}


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return ""


# -- transport=None picks torch.distributed --------------------------------------------
out["auto-transport"] = type(get_transport(None)).__name__

# -- bucket rebuild: small buckets (rebuilt after step 0) give what one bucket gives -----
eq_small, p_small, _, b_small = oracle("mvsm-v1", dict(schedule="sharded", seed=7), rank=rank,
                                       case=1, steps=8, find_unused=False, cap=0.002)
eq_one, p_one, _, b_one = oracle("mvsm-v1", dict(schedule="sharded", seed=7), rank=rank,
                                 case=1, steps=8, find_unused=False, cap=25)
out.update(rebuild_eq=np.concatenate([eq_small, eq_one]),
           rebuild_same=np.array_equal(p_small, p_one),
           buckets_first=len(b_small[0]), buckets_later=len(b_small[1]),
           buckets_changed=b_small[0] != b_small[1], buckets_one=len(b_one[-1]))

# -- no_sync() accumulation: 3 micro-batches per step ------------------------------------
for fu in (False, True):
    eq, _, st, _ = oracle("mvsm-v2", dict(schedule="allgather"), rank=rank, case=2, steps=6,
                          find_unused=fu, accumulate=3)
    out[f"nosync-{int(fu)}"] = eq

# -- DDP options: gradients as bucket views, a static graph -------------------------------
for key, ddp_options in (("view", dict(gradient_as_bucket_view=True)),
                         ("static", dict(static_graph=True))):
    eq, _, _, _ = oracle("mvsm-v1", dict(schedule="sharded"), rank=rank, case=5, steps=6,
                         find_unused=False, ddp_options=ddp_options)
    out[f"option-{key}"] = eq

# -- fp16 / bf16 parameters: buckets of that dtype, the vote in it ------------------------
for dtype in (torch.float16, torch.bfloat16):
    eq, _, _, _ = oracle("mvsm-v2", dict(schedule="allreduce"), rank=rank, case=6, steps=6,
                         find_unused=True, dtype=dtype)
    out[f"dtype-{str(dtype)[6:]}"] = eq

# -- checkpoint at step k, resume == uninterrupted ----------------------------------------
METHOD, OPTS, K, STEPS = "mvsm-v1", dict(schedule="allreduce", seed=11), 4, 9


def train(ddp, sgd, steps, first=0):
    for t in range(first, steps):
        sgd.zero_grad()
        x, y = batch(rank, t, case=3)
        loss_of(ddp, x, y).backward()
        sgd.step()


ddp, _ = pair(False, 0.002)
st = signcomm.ddp.register(ddp, METHOD, **OPTS)
sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
train(ddp, sgd, STEPS)
straight = flat(ddp.module)

ddp, _ = pair(False, 0.002)
st = signcomm.ddp.register(ddp, METHOD, **OPTS)
sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
train(ddp, sgd, K)
buf = io.BytesIO()
torch.save({"model": ddp.module.state_dict(), "hook": st.state_dict()}, buf)
pickled = pickle.dumps(st)
ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

ddp2, _ = pair(False, 0.002)       # a fresh model, fresh DDP (its buckets start over)
ddp2.module.load_state_dict(ckpt["model"])
st2 = signcomm.ddp.register(ddp2, METHOD, **OPTS)
st2.load_state_dict(ckpt["hook"])
sgd2 = torch.optim.SGD(ddp2.parameters(), lr=LR)
train(ddp2, sgd2, STEPS, first=K)
out["resume_same"] = np.array_equal(straight.view(np.uint32), flat(ddp2.module).view(np.uint32))
out["resume_step"] = st2.step

ddp3, _ = pair(False, 0.002)       # the pickled state object, attached again
ddp3.module.load_state_dict(ckpt["model"])
st3 = pickle.loads(pickled)
st3.attach(ddp3)
ddp3.register_comm_hook(st3, signcomm.ddp.hook)
train(ddp3, torch.optim.SGD(ddp3.parameters(), lr=LR), STEPS, first=K)
out["pickle_same"] = np.array_equal(straight.view(np.uint32), flat(ddp3.module).view(np.uint32))

# -- a NaN gradient on rank 1: an error on every rank, nothing updated ---------------------
for fu in (False, True):
    ddp, _ = pair(fu, 0.002)
    st = signcomm.ddp.register(ddp, "mvsm-v1", schedule="sharded")
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
    train(ddp, sgd, 2)
    before = flat(ddp.module)
    momentum = {i: v.clone() for i, v in st.momentum.items()}
    x, y = batch(rank, 2, case=4)
    if rank == 1:
        x[0, 3] = float("nan")
    err = error_of(lambda: loss_of(ddp, x, y).backward())
    out[f"nan-err-{int(fu)}"] = err
    out[f"nan-unchanged-{int(fu)}"] = (np.array_equal(before, flat(ddp.module))
                                       and st.step == 2
                                       and all(torch.equal(v, st.momentum[i])
                                               for i, v in momentum.items()))

# -- ranks that disagree: options, model, method --------------------------------------
ddp, _ = pair(False, 0.002)
out["mm-options"] = error_of(lambda: signcomm.ddp.register(ddp, "mvsm-v1", seed=rank))
ddp, _ = pair(False, 0.002)
out["mm-method"] = error_of(lambda: signcomm.ddp.register(
    ddp, "mvsm-v1" if rank == 0 else "mv-sto-signsgd-sim"))
other = Awkward()
if rank == 1:
    other.extra = nn.Linear(2, 2)
out["mm-model"] = error_of(lambda: DDP(other))

# -- a process group without the collectives the transport needs --------------------------


class AllreduceOnly(dist.ProcessGroup):
    """A backend that can only allreduce (through an inner gloo group)."""

    def __init__(self, inner, rank, size):
        super().__init__(rank, size)
        self.inner = inner

    def allreduce(self, tensors, opts=None):
        if opts is None:
            return self.inner.allreduce(tensors)
        return self.inner.allreduce(tensors, opts)

    def barrier(self, opts=None):
        return self.inner.barrier()

    def getBackendName(self):
        return "allreduce_only"


def create(store, rank, size, timeout):
    return AllreduceOnly(dist.ProcessGroupGloo(dist.PrefixStore("inner", store), rank, size,
                                               timeout), rank, size)


dist.Backend.register_backend("allreduce_only", create, devices=["cpu"])
bad = dist.new_group(backend="allreduce_only")
ddp = DDP(copy.deepcopy(Awkward()), find_unused_parameters=True)
out["bad-group"] = error_of(lambda: signcomm.ddp.MVSMHookState(bad).attach(ddp))
dist.barrier()
save_result(**out)
