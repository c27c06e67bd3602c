"""The optimizer tests' small problem and a single-process oracle of n ranks training it.

The problem (shared by the worker scripts and the oracle, it is not what is tested): a
two-layer MLP given as named tensors, a functional loss, and each rank's own batch per
step (heterogeneous: every rank draws from its own distribution).  Feature 4 of every
input is exactly 0, so column 4 of ``w1`` always has an exactly zero gradient (the sign
methods' zero coin), and the parameter ``unused`` never gets a gradient.

The oracle (``simulate``) is plain NumPy apart from torch autograd for the gradients and
torch's dtype conversion for bf16 rounding.  It shares only ``signcomm.kernels.rng`` (the
counter-based random function, tested on its own) with the code under test.  It states
the training-wrapper contract directly:

- rank j's momentum per parameter (eq. 9): ``v_1 = g_1`` (or ``v_0 = 0`` for Bernstein's
  Signum / Sun et al.), ``v_t = (1 - beta) v_{t-1} + beta g_t``, fp32, never shared;
- rank j's bit per coordinate: sign(v) with an exact 0 decided by a fair coin of the
  rank's ZERO_COIN stream, or S_R(v) (eq. 8) with R per tensor = max over ranks of
  max |v| (R = 0 -> 1), drawn from the rank's STOCHASTIC_SIGN stream; a Byzantine rank
  sends the opposite bits;
- positions: the coordinates of the parameters that have a gradient, in param-group
  order, numbered 0, 1, ... across the whole step (so fusion buckets do not matter);
- the vote from the count c of +1 bits: v1 sign(2c - n) with a tie coin of the shared
  TIE_COIN stream (position p: bit p % 64 of the word at p // 64), v2 S_1: +1 iff u32 * n < c * 2**32 with u32 the top 32 bits of the
  shared S1 stream's word;
- update, per parameter group: ``x <- x * (1 - lr * wd)`` then ``x <- x - lr * o``, each
  computed in fp32 and rounded to the parameter's dtype (what torch's fp16/bf16 arithmetic
  does; for fp16/bf16 parameters the step ``lr`` is first rounded to their dtype, as
  torch's ``add_(..., alpha=-lr)`` does).
"""
from __future__ import annotations

import numpy as np
import torch

from signcomm.kernels import rng

# name, shape, dtype key: the parameters in their order
SPECS = [("w1", (7, 5)), ("b1", (7,)), ("w2", (3, 7)), ("b2", (3,)), ("unused", (4,))]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCH = 6

# family presets, restated from docs/algorithms.md (not imported from signcomm)
METHODS = {
    #                  contribution, beta, momentum_init, variant
    "signsgd-mv": ("sign", 1.0, "first", "v1"),
    "signum-mv": ("sign", 0.1, "zero", "v1"),
    "sto-signsgd": ("sr", 1.0, "first", "v1"),
    "mv-sto-signsgd-sim": ("sr", 0.1, "zero", "v1"),
    "mvsm-v1": ("sr", 0.5, "first", "v1"),
    "mvsm-v2": ("sr", 0.1, "first", "v2"),
}


def init_params(seed, dtypes=None):
    """Name -> tensor (leaf, not requiring grad), deterministic in ``seed``."""
    dtypes = dtypes or {}
    g = np.random.default_rng(seed)
    out = {}
    for name, shape in SPECS:
        a = (g.standard_normal(shape) * 0.5).astype(np.float32)
        out[name] = torch.from_numpy(a).to(DTYPES[dtypes.get(name, "fp32")])
    return out


def batch(rank, step, hetero=True):
    """Rank ``rank``'s batch at ``step``: inputs (BATCH, 5) with feature 4 == 0, labels.
    With ``hetero`` each rank's inputs are shifted and its labels skewed its own way."""
    g = np.random.default_rng([7, rank if hetero else 0, step] if hetero else [7, step, rank])
    x = g.standard_normal((BATCH, 5)).astype(np.float32)
    if hetero:
        x += np.float32(0.7 * (rank % 3) - 0.7)
    x[:, 4] = 0.0
    p = np.roll([0.6, 0.3, 0.1], rank) if hetero else [1 / 3, 1 / 3, 1 / 3]
    y = g.choice(3, size=BATCH, p=p)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def loss_fn(params, x, y):
    """Cross entropy of the MLP; parameters of any dtype are computed in fp32."""
    w1, b1, w2, b2 = (params[k].float() for k in ("w1", "b1", "w2", "b2"))
    h = torch.relu(x @ w1.T + b1)
    return torch.nn.functional.cross_entropy(h @ w2.T + b2, y)


def eval_loss(params):
    """Loss on a fixed, homogeneous evaluation set (for 'training makes progress')."""
    xs, ys = zip(*(batch(r, 10_000 + s, hetero=False) for r in range(4) for s in range(8)))
    with torch.no_grad():
        return float(loss_fn(params, torch.cat(xs), torch.cat(ys)))


def gradients(params, rank, step, hetero=True):
    """Rank ``rank``'s gradients at ``step`` (None for parameters that get none)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    x, y = batch(rank, step, hetero)
    loss_fn(leaves, x, y).backward()
    return {k: (None if t.grad is None else t.grad) for k, t in leaves.items()}


def flat(params):
    """All parameters as one fp32 vector (bit-exact for fp16/bf16 values)."""
    return np.concatenate([params[name].detach().float().reshape(-1).numpy() for name, _ in SPECS])


def _round(x32, dtype):
    """fp32 values rounded to ``dtype`` (round to nearest even), returned as a tensor."""
    return torch.from_numpy(np.ascontiguousarray(x32, dtype=np.float32)).to(dtype)


def _shared_key(purpose, seed, step):
    return rng.key64(seed, rng.stream_id(purpose), step)


def _rank_key(purpose, seed, rank, step):
    return rng.key64(seed, rng.stream_id(purpose, rank), step)


def simulate(method, n, steps, *, lr=0.05, beta=None, weight_decay=0.0, seed=0,
             groups=None, dtypes=None, init_seed=1, hetero=True, byzantine_rank=None,
             tie="coin", grad_fn=None, start=None):
    """Train the problem on n simulated ranks; returns (trajectory, momenta).

    ``trajectory[t]`` is ``flat(params)`` after step t; ``momenta[j][name]`` is rank j's
    final momentum.  ``groups``: list of (names, lr, weight_decay); default one group
    with every parameter.  Another problem: ``start`` (name -> fp32 tensor, the first
    parameters, in their order) and ``grad_fn(params, rank, step)`` (name -> gradient
    tensor or None); the trajectory then concatenates ``start``'s names in order."""
    contribution, preset_beta, init, variant = METHODS[method]
    beta = preset_beta if beta is None else beta
    params = init_params(init_seed, dtypes) if start is None else \
        {k: v.detach().clone() for k, v in start.items()}
    groups = groups or [(list(params), lr, weight_decay)]
    if grad_fn is None:
        def grad_fn(params, j, step):
            return gradients(params, j, step, hetero)
    momenta = [dict() for _ in range(n)]
    b32 = np.float32(beta)
    trajectory = []
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order as a one-thread rank
    try:
        for step in range(steps):
            grads = [grad_fn(params, j, step) for j in range(n)]
            present = [(name, glr, gwd) for names, glr, gwd in groups for name in names
                       if grads[0][name] is not None]
            vs = []  # vs[j][k]: rank j's momentum of present[k], flat fp32
            for j in range(n):
                vj = []
                for name, _, _ in present:
                    g = grads[j][name].float().numpy().reshape(-1)
                    if beta == 1.0 and init == "first":
                        v = g.copy()
                    elif name not in momenta[j]:
                        v = g.copy() if init == "first" else g * b32
                    else:
                        v = momenta[j][name] * np.float32(1 - beta) + g * b32
                    if not (beta == 1.0 and init == "first"):
                        momenta[j][name] = v
                    vj.append(v.astype(np.float32))
                vs.append(vj)
            sizes = [v.size for v in vs[0]]
            d = sum(sizes)
            pos = np.arange(d, dtype=np.uint64)
            c = np.zeros(d, np.int64)
            if contribution == "sr":
                r = [max(float(np.abs(vs[j][k]).max()) for j in range(n)) for k in range(len(sizes))]
                r = np.repeat([x if x > 0 else 1.0 for x in r], sizes)
            for j in range(n):
                v = np.concatenate(vs[j])
                if contribution == "sign":
                    coin = rng.coin_bits(_rank_key(rng.Purpose.ZERO_COIN, seed, j, step), pos)
                    bits = np.where(v == 0, coin, v > 0)
                else:
                    u = rng.uniform(_rank_key(rng.Purpose.STOCHASTIC_SIGN, seed, j, step), pos)
                    bits = u < 0.5 + v.astype(np.float64) * (0.5 / r)
                if j == byzantine_rank:
                    bits = ~bits
                c += bits
            if variant == "v2":
                words = rng.random_words(_shared_key(rng.Purpose.S1, seed, step), pos)
                o = np.where((words >> np.uint64(32)).astype(np.int64) * n < (c << 32), 1, -1)
            else:
                o = np.sign(2 * c - n)
                if tie == "coin":
                    coin = rng.tie_coin_bits(_shared_key(rng.Purpose.TIE_COIN, seed, step), pos)
                    o = np.where(o == 0, np.where(coin, 1, -1), o)
            o = o.astype(np.float32)
            first = 0
            for (name, glr, gwd), size in zip(present, sizes):
                p = params[name]
                x = p.float().numpy().reshape(-1)
                if gwd:
                    x = _round(x * np.float32(1 - glr * gwd), p.dtype).float().numpy()
                # torch's add_(o, alpha=-lr) rounds alpha to the parameter's dtype first
                # (fp16/bf16: lr itself becomes an fp16/bf16 number), then works in fp32
                step_size = np.float32(torch.tensor(-glr, dtype=p.dtype).float().item())
                x = x + step_size * o[first:first + size]
                params[name] = _round(x, p.dtype).reshape(p.shape)
                first += size
            trajectory.append(flat(params) if start is None else np.concatenate(
                [params[k].float().reshape(-1).numpy() for k in params]))
    finally:
        torch.set_num_threads(torch_threads)
    return np.stack(trajectory), momenta
