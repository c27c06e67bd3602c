"""Measures, progress and the metrics file of the training example.

The metrics file is JSON lines (one object per line), written by rank 0:

* ``{"type": "config", ...}``: the run's settings (method, lr, beta, seed, ranks, model,
  number of parameters d, steps per epoch, engine, ...);
* ``{"type": "epoch", ...}``: one per epoch, and epoch 0 = the initial model; fields in
  ``EPOCH_FIELDS``;
* ``{"type": "step", ...}``: one per step with ``--step-metrics``; fields in
  ``STEP_FIELDS``;
* ``{"type": "summary", ...}``: the last epoch's measures plus totals.

Definitions (all measured at the end of the epoch, with the model in eval mode):

* ``train_loss``, ``train_acc``: mean cross-entropy and accuracy over the whole training
  set (every training sample, whichever rank trains on it; the computation is split
  over the ranks) -- the objective f(x) = (1/n) sum_j f_j(x) when the shares are equal;
* ``grad_l1``, ``grad_l2``: the l1 and l2 norms of the full-batch gradient of that same
  f at the end-of-epoch parameters (the paper's figures), each rank computing the sum
  over its share, one float64 allreduce adding them;
* ``test_loss``, ``test_acc``: on the held-out test set;
* ``train_loss_running``: mean minibatch loss over the epoch's steps, all ranks;
* ``bytes_sent`` / ``bytes_received``: per rank in this epoch, mean over ranks
  (``*_max``: the largest rank; ``*_total``: since the start), as counted by the byte
  ledger (bandwidth-optimal algorithms' bytes, docs/algorithms.md's cost table);
* ``time_compute_s`` (forward + backward), ``time_compress_s`` (momentum, S_R or sign,
  packing), ``time_comm_s``, ``time_vote_s``, ``time_update_s``: seconds in this epoch,
  mean over ranks; ``time_eval_s`` and ``epoch_wall_s`` on rank 0.
"""
from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

EPOCH_FIELDS = (
    "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
    "train_loss_running", "grad_l1", "grad_l2",
    "bytes_sent", "bytes_received", "bytes_sent_max", "bytes_received_max",
    "bytes_sent_total", "bytes_received_total",
    "time_compute_s", "time_compress_s", "time_comm_s", "time_vote_s", "time_update_s",
    "time_eval_s", "epoch_wall_s",
)
STEP_FIELDS = ("epoch", "step", "loss", "acc", "bytes_sent", "bytes_received",
               "time_compute_s", "time_compress_s", "time_comm_s", "time_vote_s",
               "time_update_s")


# ---------------------------------------------------------------------------------------
# full-data measures
# ---------------------------------------------------------------------------------------
def _chunks(idx, size):
    for a in range(0, len(idx), size):
        yield idx[a:a + size]


def local_sums(model, x, y, idx, *, want_grad: bool, chunk: int = 512):
    """(loss sum, correct, count, gradient sum as a flat float64 array or None) of the
    samples ``idx`` on this rank.  The gradient comes from ``torch.autograd.grad`` so
    that ``.grad`` and any gradient hooks (Horovod's) are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, correct = 0.0, 0
    grad = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64) if want_grad else None
    was_training = model.training
    model.eval()
    try:
        for part in _chunks(idx, chunk):
            xb = torch.from_numpy(x[part])
            yb = torch.from_numpy(y[part])
            if want_grad:
                out = model(xb)
                loss = F.cross_entropy(out, yb, reduction="sum")
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                grad += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                   for g, p in zip(gs, params)])
            else:
                with torch.no_grad():
                    out = model(xb)
                    loss = F.cross_entropy(out, yb, reduction="sum")
            loss_sum += float(loss.detach())
            correct += int((out.detach().argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum, correct, len(idx), (grad.numpy() if want_grad else None)


def evaluate(model, data, train_idx, test_idx, cluster, *, full_grad: bool = True):
    """The end-of-epoch measures of the module docstring, identical on every rank."""
    cluster.average_buffers(model)
    tl, tc, tn, g = local_sums(model, data.x_train, data.y_train, train_idx, want_grad=full_grad)
    el, ec, en, _ = local_sums(model, data.x_test, data.y_test, test_idx, want_grad=False)
    head = np.array([tl, tc, tn, el, ec, en], np.float64)
    buf = np.concatenate([head, g]) if full_grad else head
    tot = cluster.allreduce(buf)
    tl, tc, tn, el, ec, en = tot[:6]
    out = dict(train_loss=tl / tn, train_acc=tc / tn,
               test_loss=el / max(en, 1), test_acc=ec / max(en, 1))
    if full_grad:
        grad = tot[6:] / tn
        out.update(grad_l1=float(np.abs(grad).sum()), grad_l2=float(np.sqrt((grad ** 2).sum())))
    else:
        out.update(grad_l1=None, grad_l2=None)
    return {k: (float(v) if v is not None else None) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# per-epoch accumulation of the step statistics
# ---------------------------------------------------------------------------------------
class EpochMeter:
    """Adds up this rank's step statistics over an epoch."""

    KEYS = ("compute_s", "compress_s", "comm_s", "vote_s", "update_s",
            "bytes_sent", "bytes_received", "loss_sum", "steps")

    def __init__(self):
        self.v = dict.fromkeys(self.KEYS, 0.0)

    def add(self, compute_s, stats, loss):
        self.v["compute_s"] += compute_s
        for k in ("compress_s", "comm_s", "vote_s", "update_s", "bytes_sent", "bytes_received"):
            self.v[k] += float(stats.get(k, 0) or 0)
        self.v["loss_sum"] += float(loss)
        self.v["steps"] += 1

    def reduce(self, cluster):
        """Mean over ranks of every field, and the max of the byte counts."""
        local = np.array([self.v[k] for k in self.KEYS], np.float64)
        total = cluster.allreduce(local, "sum")
        top = cluster.allreduce(local[5:7], "max")
        n = cluster.size
        mean = dict(zip(self.KEYS, total / n))
        steps = max(mean["steps"], 1)
        return {
            "train_loss_running": mean["loss_sum"] / steps if mean["steps"] else None,
            "bytes_sent": int(round(mean["bytes_sent"])),
            "bytes_received": int(round(mean["bytes_received"])),
            "bytes_sent_max": int(top[0]), "bytes_received_max": int(top[1]),
            "time_compute_s": mean["compute_s"], "time_compress_s": mean["compress_s"],
            "time_comm_s": mean["comm_s"], "time_vote_s": mean["vote_s"],
            "time_update_s": mean["update_s"],
        }


# ---------------------------------------------------------------------------------------
# output on rank 0
# ---------------------------------------------------------------------------------------
def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged run shows null
    if isinstance(value, (np.floating,)):
        return _clean(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


class MetricsWriter:
    """JSON lines to ``path`` (nothing when ``path`` is None); flushed per record."""

    def __init__(self, path):
        self.f = open(path, "w", encoding="utf-8") if path else None

    def write(self, kind, **fields):
        if self.f is None:
            return
        rec = {"type": kind}
        rec.update({k: _clean(v) for k, v in fields.items()})
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def read_metrics(path):
    """The records of a metrics file, as a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A plain-text progress bar for one epoch on stderr: redrawn in place on a terminal;
    elsewhere (logs, pipes) printed at every quarter of the epoch."""

    def __init__(self, total, label, enabled=True, width=24, stream=None):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = 0
        self._next_mark = 1

    def update(self, loss=None):
        if not self.enabled:
            return
        self.done += 1
        quarter = self.done * 4 // self.total
        if not self.tty and quarter < self._next_mark and self.done < self.total:
            return
        self._next_mark = quarter + 1
        filled = self.width * self.done // self.total
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate
        text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {rate:.1f} it/s eta {eta:.0f}s"
                + (f" loss {loss:.4f}" if loss is not None else ""))
        if self.tty:
            self.stream.write("\r" + text)
            if self.done >= self.total:
                self.stream.write("\r" + " " * len(text) + "\r")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def human_bytes(b) -> str:
    b = float(b)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000.0
    return f"{b:.2f} TB"


def epoch_line(prefix, rec) -> str:
    """The one-line summary of an epoch record."""
    def f(k, fmt):
        v = rec.get(k)
        return "n/a" if v is None else format(v, fmt)
    parts = [f"{prefix}epoch {rec['epoch']:>3}", f"loss {f('train_loss', '.4f')}",
             f"train acc {f('train_acc', '.3f')}", f"test acc {f('test_acc', '.3f')}"]
    if rec.get("grad_l2") is not None:
        parts.append(f"|g|1 {rec['grad_l1']:.3g} |g|2 {rec['grad_l2']:.3g}")
    if rec["epoch"] > 0:
        parts.append(f"sent/rank {human_bytes(rec['bytes_sent'])}")
        parts.append("time c/z/m/v {:.2f}/{:.2f}/{:.2f}/{:.2f}s".format(
            rec["time_compute_s"], rec["time_compress_s"], rec["time_comm_s"],
            rec["time_vote_s"]))
    return "  ".join(parts)
