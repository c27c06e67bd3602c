"""A single-process simulation of n ranks' sign vote in plain NumPy: slow and obviously
right.  It shares only the random-number function (rng.py, tested on its own) with the
code under test."""
import numpy as np

from signcomm.kernels import rng

SEED, STEP = 11, 7


def rank_input(rank, d):
    """Rank ``rank``'s input of length d in the vote tests (with exact zeros)."""
    v = np.random.default_rng([rank, d]).standard_normal(d).astype(np.float32)
    v[::101] = 0.0  # exact zeros: sign() needs its coin
    return v


def rank_key(seed, purpose, rank, step):
    return rng.key64(seed, rng.stream_id(purpose, rank), step)


def contribution_bits(v, rank, seed, step, offset, kind, r=None):
    """The bool vector rank ``rank`` sends: sign(v) (zeros by its coin) or S_R(v)."""
    pos = np.arange(v.size, dtype=np.uint64) + np.uint64(offset)
    if kind == "sign":
        coin = rng.coin_bits(rank_key(seed, rng.Purpose.ZERO_COIN, rank, step), pos)
        return np.where(v == 0, coin, v > 0)
    u = rng.uniform(rank_key(seed, rng.Purpose.STOCHASTIC_SIGN, rank, step), pos)
    p = 0.5 + v.astype(np.float64) * (0.5 / r)
    return u < p


def oracle_vote(inputs, seed, step, offset, kind, variant, tie):
    """Returns (values o in {-1, 0, +1}, counts c) for the inputs of all n ranks."""
    n = len(inputs)
    d = inputs[0].size
    r = None
    if kind == "sr":
        r = max(float(np.abs(v).max()) if v.size else 0.0 for v in inputs)
        r = r if r > 0 else 1.0
    c = np.zeros(d, np.int64)
    for rank, v in enumerate(inputs):
        c += contribution_bits(v, rank, seed, step, offset, kind, r)
    pos = np.arange(d, dtype=np.uint64) + np.uint64(offset)
    if variant == "v2":
        u32 = (rng.random_words(rng.key64(seed, rng.stream_id(rng.Purpose.S1), step), pos)
               >> np.uint64(32)).astype(np.int64)
        return np.where(u32 * n < (c << 32), 1, -1), c
    o = np.sign(2 * c - n)
    if tie == "coin":
        coin = rng.tie_coin_bits(rng.key64(seed, rng.stream_id(rng.Purpose.TIE_COIN), step), pos)
        o = np.where(o == 0, np.where(coin, 1, -1), o)
    return o, c
