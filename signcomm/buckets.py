"""Fusion buckets: many parameters flattened into a few flat buffers, so a step makes a
few collectives, not one per tensor.  Each tensor stays a segment of its bucket (R is
per tensor).  A layout depends only on which parameters have gradients, in a fixed
order, so every rank builds the same one."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BUCKET_ELEMENTS = 1 << 22  # 4 Mi coordinates = 16 MiB of fp32, 512 KiB packed


@dataclass
class Bucket:
    params: list          # the parameters, in order
    sizes: np.ndarray     # numel of each (the segments)
    offset: int           # position of the bucket's first coordinate in the step's layout

    @property
    def d(self) -> int:
        return int(self.sizes.sum())


def plan_buckets(params, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS):
    """Greedy consecutive buckets of at most ``bucket_elements`` coordinates (a larger
    tensor gets a bucket of its own).  Positions run on across buckets, so each
    coordinate of the step has its own random-stream position."""
    if bucket_elements < 1:
        raise ValueError(f"bucket_elements must be >= 1, got {bucket_elements}")
    buckets, current, sizes, offset, start = [], [], [], 0, 0
    for p in params:
        n = p.numel()
        if current and sum(sizes) + n > bucket_elements:
            buckets.append(Bucket(current, np.array(sizes, np.int64), start))
            current, sizes, start = [], [], offset
        current.append(p)
        sizes.append(n)
        offset += n
    if current:
        buckets.append(Bucket(current, np.array(sizes, np.int64), start))
    return buckets
