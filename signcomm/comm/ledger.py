"""The byte ledger: every transport call, per rank, with a per-step summary.

Bytes are those a bandwidth-optimal algorithm moves for this rank (what the cost
table of docs/algorithms.md counts), computed from the real buffer sizes of each call:
- allgather of m bytes per rank: sent (n-1) m, received (n-1) m (ring);
- alltoall of m bytes per peer: sent (n-1) m, received (n-1) m;
- allreduce of B bytes: sent and received 2 (n-1)/n B (ring reduce-scatter + allgather);
- broadcast of B bytes: the root sends (n-1) B in total, every other rank receives B.
The MPI library may pick another algorithm; the wire bytes then differ, the data does not.

Each record has a ``kind``: "data" for the payload of a vote, "control" for the small
calls around it (consistency checks, shared R), "local" for the hierarchical vote's calls
inside a machine (the gradients' reduce-scatter, the voted bits' allgather), so "data" is
what crosses machines.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Record:
    op: str
    bytes_sent: int
    bytes_received: int
    seconds: float
    kind: str = "data"
    step: int | None = None


@dataclass
class StepSummary:
    step: int | None
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    data_bytes_sent: int = 0
    data_bytes_received: int = 0
    local_bytes_sent: int = 0
    local_bytes_received: int = 0
    by_op: dict = field(default_factory=dict)

    def add(self, rec: Record):
        self.calls += 1
        self.bytes_sent += rec.bytes_sent
        self.bytes_received += rec.bytes_received
        self.seconds += rec.seconds
        if rec.kind == "data":
            self.data_bytes_sent += rec.bytes_sent
            self.data_bytes_received += rec.bytes_received
        elif rec.kind == "local":
            self.local_bytes_sent += rec.bytes_sent
            self.local_bytes_received += rec.bytes_received
        op = self.by_op.setdefault(rec.op, [0, 0, 0, 0.0])
        op[0] += 1
        op[1] += rec.bytes_sent
        op[2] += rec.bytes_received
        op[3] += rec.seconds


class Ledger:
    """Records of the current step plus summaries of the last ``history`` steps."""

    def __init__(self, history: int = 10000):
        self.history = history
        self.step = None
        self.records: list[Record] = []
        self.summaries: "OrderedDict[object, StepSummary]" = OrderedDict()
        self.total = StepSummary(step=None)
        self._kind = "data"

    def begin_step(self, step):
        """Start counting a new step (records of the previous one are dropped; their
        summary stays)."""
        self.step = step
        self.records = []

    def record(self, op, bytes_sent, bytes_received, seconds, kind=None):
        rec = Record(op, int(bytes_sent), int(bytes_received), float(seconds),
                     kind or self._kind, self.step)
        self.records.append(rec)
        summary = self.summaries.get(self.step)
        if summary is None:
            summary = self.summaries[self.step] = StepSummary(step=self.step)
            while len(self.summaries) > self.history:
                self.summaries.popitem(last=False)
        summary.add(rec)
        self.total.add(rec)
        return rec

    @contextmanager
    def kind(self, kind):
        """Tag the calls made inside the block (e.g. "control")."""
        old, self._kind = self._kind, kind
        try:
            yield
        finally:
            self._kind = old

    def summary(self, step=None) -> StepSummary:
        """Summary of ``step`` (default: the current one); empty if nothing recorded."""
        key = self.step if step is None else step
        return self.summaries.get(key, StepSummary(step=key))

    def reset(self):
        self.__init__(self.history)


class timed:
    """``with timed() as t: ...; t.seconds``."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    """Bytes each rank sends (and receives) in a ring allreduce of ``nbytes``."""
    return (2 * (n - 1) * int(nbytes)) // n if n > 0 else 0
