"""Overlap: vote on a bucket while backward is still computing the earlier layers.

A post-accumulate-grad hook on every parameter counts the ready gradients of each
bucket.  Buckets are voted strictly in reverse order (the last layers' gradients are
ready first), one at a time on a single worker thread, so every rank issues the same
collectives in the same order.  ``step()`` then votes whatever was not started, waits,
and applies the updates.  Momentum is written to the bucket's other momentum buffer and
committed only when every bucket succeeded, so an error (NaN, mismatch) still leaves
nothing updated.

The layout is the one the synchronous path uses when every parameter has a gradient,
with the same random-stream positions, so overlap changes timing, never results.
Assumes one backward per step and that every rank produces gradients for the same
parameters (otherwise the step falls back to the synchronous path).

Overlap votes on each gradient as backward accumulates it: changes made to ``.grad``
between ``backward()`` and ``step()`` (clipping, rescaling) are not seen, as with
Horovod's overlapped allreduce.  Use the synchronous path (the default) for those.

The hooks hold the engine, and the engine the optimizer, only weakly: dropping the
optimizer (or calling its ``close()``) removes the hooks, so a model can outlive it."""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from .buckets import plan_buckets


class OverlapEngine:
    def __init__(self, opt):
        self._opt = weakref.ref(opt)
        self.entries = opt._present(require_grad=False)
        self.buckets = plan_buckets([p for _, p, _ in self.entries], opt.bucket_elements)
        self.bucket_of, self.slices, first = {}, [], 0
        for i, b in enumerate(self.buckets):
            self.slices.append(slice(first, first + len(b.params)))
            for p in b.params:
                self.bucket_of[id(p)] = i
            first += len(b.params)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="signcomm-overlap")
        self.lock = threading.Lock()
        self.futures = {}
        self.ready = [0] * len(self.buckets)
        self.next = len(self.buckets) - 1
        engine = weakref.ref(self)

        def hook(p):
            live = engine()
            if live is not None:
                live._hook(p)

        self.handles = [p.register_post_accumulate_grad_hook(hook) for _, p, _ in self.entries]
        self._finalizer = weakref.finalize(self, _release, self.handles, self.executor)

    @property
    def opt(self):
        opt = self._opt()
        if opt is None:
            raise RuntimeError("the optimizer of this overlap engine no longer exists")
        return opt

    @property
    def present(self):
        return self.entries

    def matches(self, present) -> bool:
        return [id(p) for _, p, _ in present] == [id(p) for _, p, _ in self.entries]

    def _hook(self, p):
        with self.lock:
            i = self.bucket_of.get(id(p))
            if i is None:
                return
            self.ready[i] += 1
            self._submit_ready(force=False)

    def _submit_ready(self, force):
        while self.next >= 0 and (force or self.ready[self.next] >= len(self.buckets[self.next].params)):
            self.futures[self.next] = self.executor.submit(self._job, self.next)
            self.next -= 1

    def _job(self, i):
        opt, step = self.opt, self.opt._step
        if i == len(self.buckets) - 1:
            opt.transport.ledger.begin_step(step)
        entries = self.entries[self.slices[i]]
        t0 = time.perf_counter()
        flat, vmax, bad = opt._prepare(opt._momenta(self.buckets), i, entries)
        prepare_s = time.perf_counter() - t0
        opt._agree(step, entries, f"bucket {i}", bad)
        vote, clamped, compress_s, vote_s = opt._vote_bucket(step, self.buckets[i], flat,
                                                             opt._resolve_r(vmax))
        return vote, clamped, prepare_s + compress_s, vote_s

    def _drain(self):
        """Wait for every started job; return results by bucket and the first error."""
        results, error = {}, None
        for i in sorted(self.futures, reverse=True):
            try:
                results[i] = self.futures[i].result()
            except BaseException as exc:  # noqa: BLE001  re-raised by the caller
                error = error or exc
        return results, error

    def reset(self):
        """Forget this step's progress (waiting for started jobs first)."""
        with self.lock:
            self._drain()
            self.futures = {}
            self.ready = [0] * len(self.buckets)
            self.next = len(self.buckets) - 1

    def finish(self, step):
        """Vote the buckets not started yet, wait, commit momentum; returns (votes in
        bucket order, clamped, compress_s, vote_s)."""
        with self.lock:
            self._submit_ready(force=True)
            results, error = self._drain()
            self.futures = {}
            self.ready = [0] * len(self.buckets)
            self.next = len(self.buckets) - 1
        if error is not None:
            raise error
        votes, clamped, compress_s, vote_s = [], 0, 0.0, 0.0
        mom = self.opt._momenta(self.buckets)
        for i in range(len(self.buckets)):
            vote, c, cs, vt = results[i]
            self.opt._commit(mom, i, self.entries[self.slices[i]])
            votes.append(vote)
            clamped, compress_s, vote_s = clamped + c, compress_s + cs, vote_s + vt
        return votes, clamped, compress_s, vote_s

    def close(self):
        """Wait for started jobs, remove the hooks, stop the worker thread."""
        with self.lock:
            self._drain()
            self.futures = {}
        self._finalizer()


def _release(handles, executor):
    for h in handles:
        h.remove()
    executor.shutdown(wait=False)
