"""Overlap: vote on a bucket while backward is still computing the earlier layers.

A post-accumulate-grad hook on every parameter counts the ready gradients of each
bucket.  When a bucket is complete (buckets complete in reverse order: the last layers'
gradients are ready first), the hook runs its momentum pass and posts its control
collective (agreement + shared-R maxima), non-blocking; later hooks post each bucket's
vote as soon as its control has arrived.  Nothing blocks during backward and no thread
is involved: the collectives run in the transport's background (Horovod's thread, or
MPI's progress, which the hooks' ``test`` calls drive).  ``step()`` then posts whatever
was not started, waits, and applies the updates.  Momentum is written to the bucket's
spare buffer and committed only when every bucket succeeded, so an error (NaN,
mismatch) still leaves nothing updated.

Ordering: each channel's collectives are started in bucket order on every rank (control
on channel 0, vote rounds on channels 1 and 2), whatever the timing, so ranks always
match.  A bucket's vote needs its control result first (the shared R of its tensors),
so the overlapped step makes one small control allreduce per bucket; the synchronous
step makes one per step.

The layout is the one the synchronous path uses when every parameter has a gradient,
with the same random-stream positions, so overlap changes timing, never results.
Assumes one backward per step.  A step in which some parameter has no gradient falls
back to the synchronous path (``reset``): first every bucket not posted yet gets its
control, a normal one or, where this rank lacks gradients, one naming them, so every
rank has posted one control per bucket in the same order; ranks whose gradient sets
differ then get ``RankMismatchError`` on every rank (and the next step starts clean),
ranks that all lack the same gradients go on with the synchronous step.

Overlap votes on each gradient as backward accumulates it: changes made to ``.grad``
between ``backward()`` and ``step()`` (clipping, rescaling) are not seen, as with
Horovod's overlapped allreduce.  Use the synchronous path (the default) for those.

The hooks hold this object, and it the optimizer, only weakly: dropping the optimizer
(or calling its ``close()``) removes the hooks, so a model can outlive it."""
from __future__ import annotations

import weakref


class OverlapEngine:
    def __init__(self, opt):
        self._opt = weakref.ref(opt)
        self.entries = opt.entries(require_grad=False)
        self.layout = opt.engine.layout_for([p for _, p, _ in self.entries])
        self.bucket_of, self.slices, first = {}, [], 0
        for i, b in enumerate(self.layout.buckets):
            self.slices.append(slice(first, first + len(b.params)))
            for p in b.params:
                self.bucket_of[id(p)] = i
            first += len(b.params)
        self._clear()
        engine = weakref.ref(self)

        def hook(p):
            live = engine()
            if live is not None:
                live._hook(p)

        handles = [p.register_post_accumulate_grad_hook(hook) for _, p, _ in self.entries]
        self._finalizer = weakref.finalize(self, _release, handles)

    def _clear(self):
        n = len(self.layout.buckets)
        self.ready = [0] * n
        self.next = n - 1            # the next bucket to prepare (reverse order)
        self.order = []              # buckets prepared, in the order they were
        self.prepared, self.controls, self.errors = {}, {}, {}
        self.skipped = set()         # buckets without gradients that every rank skipped

    @property
    def opt(self):
        opt = self._opt()
        if opt is None:
            raise RuntimeError("the optimizer of this overlap engine no longer exists")
        return opt

    @property
    def started(self) -> bool:
        return bool(self.order)

    def matches(self, present) -> bool:
        return [id(p) for _, p, _ in present] == [id(p) for _, p, _ in self.entries]

    # -- during backward -------------------------------------------------------------------
    def _hook(self, p):
        i = self.bucket_of.get(id(p))
        if i is None:
            return
        self.ready[i] += 1
        while self.next >= 0 and self.ready[self.next] >= len(self.layout.buckets[self.next].params):
            self._prepare(self.next)
            self.next -= 1
        self._progress(block=False)

    def _prepare(self, i):
        opt = self.opt
        if not self.order:
            opt.transport.ledger.begin_step(opt.engine.step)
        entries = self.entries[self.slices[i]]
        prepared = opt.prepare_bucket(self.layout, i, entries)
        self.prepared[i] = prepared
        self.controls[i] = opt.engine.start_control(
            self.layout, [prepared], opt.signature(entries), self._what(i),
            name=f"signcomm.ctrl.b{i}", capacity=opt.control_capacity())
        self.order.append(i)

    def _what(self, i):
        return (f"bucket {i} of optimizer step {self.opt.engine.step} (parameter layout, "
                "settings and gradients; with overlap=True every rank must have gradients "
                "for the same parameters)")

    def _post_missing(self, i, missing):
        """Bucket ``i``'s control from a rank without gradients for ``missing`` (names):
        the same collective as ``_prepare``'s, so ranks stay matched; it agrees only with
        ranks that lack the same gradients."""
        opt = self.opt
        if not self.order:
            opt.transport.ledger.begin_step(opt.engine.step)
        self.prepared[i] = None
        self.controls[i] = opt.transport.start_agree(
            {"bucket": i, "parameters without a gradient": tuple(missing)}, what=self._what(i),
            values=opt.engine.control_values([], opt.control_capacity()), channel=0,
            name=f"signcomm.ctrl.b{i}")
        self.order.append(i)

    def _progress(self, block):
        """Post what can be posted, in bucket order per channel; ``block``: to the end."""
        engine = self.opt.engine
        prev = None   # the previous bucket in order: its rounds are posted first
        for i in self.order:
            p = self.prepared[i]
            if p is None:  # a bucket without gradients here (reset): only its control
                if i not in self.errors and i not in self.skipped:
                    if not (block or self.controls[i].test()):
                        break
                    try:
                        self.controls[i].wait()
                        self.skipped.add(i)
                    except Exception as exc:  # noqa: BLE001  on every rank
                        self.errors[i] = exc
                prev = i
                continue
            if p.handle is None and i not in self.errors:
                if prev is not None and not self._posted(prev, 1):
                    break
                if not (block or self.controls[i].test()):
                    break
                try:
                    maxima = self.controls[i].wait()
                except Exception as exc:  # noqa: BLE001  raised by finish(), on every rank
                    self.errors[i] = exc
                    prev = i
                    continue
                engine.start(self.layout, p, engine.resolve_r([p], maxima)[0])
            h = p.handle
            while h is not None and not h.done:
                ahead = self._handle(prev) if prev is not None else None
                may = ahead is None or ahead.done or ahead.posted > h.posted
                if not may or not (block or h.ready()):
                    break
                h.advance()
            prev = i

    def _handle(self, i):
        p = self.prepared[i]
        return None if p is None else p.handle

    def _posted(self, i, rounds):
        h = self._handle(i)
        return (i in self.errors or i in self.skipped
                or (h is not None and (h.done or h.posted >= rounds)))

    # -- in step() ---------------------------------------------------------------------------
    def finish(self):
        """Prepare the buckets not started yet, wait for every vote; returns (layout,
        slices, prepared in bucket order).  Raises the first error (on every rank)."""
        while self.next >= 0:
            self._prepare(self.next)
            self.next -= 1
        try:
            self._progress(block=True)
            if self.errors:
                raise self.errors[max(self.errors)]
            return self.layout, self.slices, [self.prepared[i] for i in range(len(self.slices))]
        finally:
            self._clear()

    def reset(self, present=None):
        """Forget this step's progress, finishing what was posted so ranks stay matched.
        With ``present`` (the step's entries with a gradient, not all of ``entries``):
        first post every remaining bucket's control (``_post_missing`` where gradients
        are missing), then raise the first error, on every rank, if the ranks' gradient
        sets differ.  Always clears the ready counts, so a step whose gradients covered
        only some buckets does not carry them into the next backward."""
        try:
            if present is not None:
                have = {id(p) for _, p, _ in present}
                while self.next >= 0:
                    i = self.next
                    missing = [name for _, p, name in self.entries[self.slices[i]]
                               if id(p) not in have]
                    if missing:
                        self._post_missing(i, missing)
                    else:
                        self._prepare(i)
                    self.next -= 1
            if self.order:
                self._progress(block=True)
            if self.errors:
                raise self.errors[max(self.errors)]
        finally:
            self._clear()

    def close(self):
        """Finish posted collectives, remove the hooks."""
        self.reset()
        self._finalizer()


def _release(handles):
    for h in handles:
        h.remove()
