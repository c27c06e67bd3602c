"""Compile (or load from numba's on-disk cache) every CPU kernel for the input types the
engine uses, so the first real call, or the first multi-rank job, pays no compile time."""
from __future__ import annotations

import numpy as np


def warmup() -> None:
    from . import ops
    from .rng import Purpose, key64, stream_id

    key = key64(0, stream_id(Purpose.TIE_COIN), 0)
    for d in (77, ops.PARALLEL_MIN):   # the serial and the parallel variants
        for dtype in (np.float32, np.float64):
            x = np.linspace(-1, 1, d).astype(dtype)
            ops.pack_signs(x, zero_key=key)
            ops.stochastic_sign_pack(x, 1.0, key)
        for n in (2, 3):
            c = np.zeros(d, np.uint8)
            for variant, tie in (("v1", "coin"), ("v1", "zero"), ("v2", "coin")):
                ops.vote_from_counts(c, n, variant=variant, tie=tie, key=key)
                ops.vote_values_from_counts(c, n, rule=ops.VoteRule(variant, tie), key=key)
    gathered = np.zeros((3, 10), np.uint8)
    for tie in ("coin", "zero"):
        ops.majority_vote(gathered, 77, tie=tie, key=key)
    counts = ops.vote_counts(gathered, 77)
    ops.vote_values(ops.majority_vote(gathered, 77, tie="zero", key=key), 77)
    words = ops.pack_count_fields(gathered[0], 77, 2)
    wide = ops.unpack_count_fields(words, 77, 2)
    for c in (counts, wide):
        for variant, tie in (("v1", "coin"), ("v1", "zero"), ("v2", "coin")):
            ops.vote_from_counts(c, 3, variant=variant, tie=tie, key=key)
            ops.vote_values_from_counts(c, 3, rule=ops.VoteRule(variant, tie), key=key)

    # the optimizer step's kernels, serial and parallel variants (types, not sizes, matter)
    from . import _step

    v, g, out = (np.linspace(-1, 1, 77).astype(np.float32) for _ in range(3))
    for kernel in (_step.momentum_serial, _step.momentum_parallel):
        kernel(v, g, out, np.float32(0.5), _step.MODE_LERP)
    bits, mask = np.zeros(10, np.uint8), np.ones(10, np.uint8)
    for kernel in (_step.apply_serial, _step.apply_parallel):
        for nz in (_step._EMPTY, mask):
            kernel(out, bits, nz, 0, np.float32(-0.1), np.float32(1.0), False)

    # the count-field codec (the allreduce schedule and the Horovod compressors' wires):
    # every layout family and word type, serial and parallel, and the uint8 counts'
    # vote; the max |v| of a shared R
    from . import fields
    from ..contribution import local_max_abs

    for n in (2, 3):
        for word in ("int64", "float64"):
            for radix in (False, True):
                lay = fields.layout(n, word, radix)
                for d in (77, (fields.PARALLEL_WORDS + 1) * lay.f):
                    packed = np.zeros((d + 7) // 8, np.uint8)
                    words, _ = fields.encode_layout(packed, d, lay)
                    for dtype in (np.uint8, np.int64):
                        fields.decode_layout(words, d, lay, n, np.zeros(d, dtype))
                    fields.decode_layout(words, d, lay, n, np.zeros(d, np.uint8), mix_base=0)
        ops.vote_from_counts(np.zeros(77, np.uint8), n, variant="v1", tie="coin", key=key)
    for dtype in (np.float32, np.float64):
        local_max_abs(np.linspace(-1, 1, 77).astype(dtype), np.array([40, 37]))
