"""The oracle contract on real ranks (gloo): DDP + signcomm hook + SGD(lr) against
signcomm's optimizer, bit for bit, every step.

Saves per rank, for each case k of ``CASES``: ``eq-k`` (one bool per step: the two
faces' parameters are bit-identical after that step), ``params-k`` (the DDP face's
final flat parameters, for the check across ranks) and ``moved-k``."""
import numpy as np

from ddp_common import CASES, Awkward, flat, init, oracle
from harness import save_result

rank, n = init()
out = {}
for k, (method, opts, fu) in enumerate(CASES):
    before = flat(Awkward())
    eq, params, state, _ = oracle(method, opts, rank=rank, case=k, find_unused=fu)
    out[f"eq-{k}"] = eq
    out[f"params-{k}"] = params
    out[f"moved-{k}"] = not np.array_equal(before, params)
save_result(**out)
