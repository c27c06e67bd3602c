"""The training methods of the example: what one optimizer step does on this rank.

Every method object has ``step() -> dict`` (called after ``loss.backward()``) returning
this rank's ``compress_s, comm_s, vote_s, update_s, bytes_sent, bytes_received`` for the
step, and ``wire`` (a short description of what goes over the wire).

Families (``--method``):

* majority vote, from ``signcomm`` (momentum local to each rank, 1-bit vote):
  ``mvsm-v1 mvsm-v2 signsgd-mv signum-mv sto-signsgd mv-sto-signsgd-sim``;
* Horovod compressors through an unmodified ``hvd.DistributedOptimizer`` (momentum, if
  any, in the user's optimizer, after the vote): ``hvd-sign hvd-sr hvd-s1``;
* full precision: ``sgdm`` and ``adamw`` over an fp32 allreduce of the gradients --
  Horovod's ``hvd.DistributedOptimizer`` under the Horovod engine, mpi4py's Allreduce
  (through ``signcomm.comm.MPITransport``, which counts the bytes) under the MPI engine;
* single process: ``signum`` and ``signsgd`` (Algorithm 1 / eq. 3).

``beta`` is always the paper's weight of the NEW gradient (beta = 1: no momentum).  At the
PyTorch edge the momentum is ``mu = 1 - beta``: SGDM uses ``SGD(momentum=1-beta)``, AdamW
``betas=(1-beta, 0.999)``, and the compressor methods an EMA ``SGD(momentum=1-beta,
dampening=1-beta)`` so their step stays ``lr * (+-1 average)``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

VOTE_METHODS = ("mvsm-v1", "mvsm-v2", "signsgd-mv", "signum-mv", "sto-signsgd",
                "mv-sto-signsgd-sim")
SINGLE_METHODS = ("signum", "signsgd")
COMPRESSOR_METHODS = ("hvd-sign", "hvd-sr", "hvd-s1")
FP32_METHODS = ("sgdm", "adamw")
METHODS = VOTE_METHODS + SINGLE_METHODS + COMPRESSOR_METHODS + FP32_METHODS

# Methods whose update has no momentum: --beta does not apply.
NO_MOMENTUM = ("signsgd-mv", "sto-signsgd", "signsgd")

# Defaults (lr, beta) on the digits CNN: the best settings of the `make compare` grid
# (hvd-*: those of their majority-vote counterparts).
DEFAULTS = {
    "mvsm-v1": (0.01, 0.1), "mvsm-v2": (0.02, 0.1), "signsgd-mv": (0.005, None),
    "signum-mv": (0.01, 0.5), "sto-signsgd": (0.01, None),
    "mv-sto-signsgd-sim": (0.02, 0.1), "signum": (0.005, 0.1), "signsgd": (0.01, None),
    "hvd-sign": (0.005, 1.0), "hvd-sr": (0.01, 1.0), "hvd-s1": (0.01, 1.0),
    "sgdm": (0.1, 0.1), "adamw": (0.005, 0.1),
}

STAT_KEYS = ("compress_s", "comm_s", "vote_s", "update_s", "bytes_sent", "bytes_received")


class MethodError(ValueError):
    """The method cannot run as asked (a user error: clear message)."""


def uses_beta(method: str) -> bool:
    return method not in NO_MOMENTUM


def family(method: str) -> str:
    for name, group in (("vote", VOTE_METHODS), ("single", SINGLE_METHODS),
                        ("compressor", COMPRESSOR_METHODS), ("fp32", FP32_METHODS)):
        if method in group:
            return name
    raise MethodError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")


def _zero_stats():
    return {k: 0.0 if k.endswith("_s") else 0 for k in STAT_KEYS}


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    from signcomm.comm import ring_allreduce_bytes as f
    return int(f(int(nbytes), int(n)))


def _signcomm():
    """``signcomm`` with its optimizers, or a MethodError saying they are not there yet."""
    import signcomm
    if not hasattr(signcomm, "create_optimizer"):
        raise MethodError("this method needs signcomm.create_optimizer (the training wrapper, "
                          "signcomm/optim), which this checkout does not have yet")
    return signcomm


def _grad_params(model):
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------
class SignCommMethod:
    """A ``signcomm`` optimizer by name: the majority-vote family, or the single-process
    Signum / signSGD."""

    def __init__(self, name, model, cluster, *, lr, beta, schedule, seed, byzantine,
                 weight_decay):
        sc = _signcomm()
        options = {}
        if uses_beta(name) and beta is not None:
            options["beta"] = beta
        if weight_decay:
            options["weight_decay"] = weight_decay
        if name in VOTE_METHODS:
            options.update(transport=cluster.engine, seed=seed)
            if schedule is not None:
                options["schedule"] = schedule
            if byzantine:
                options["byzantine"] = True
        self.opt = sc.create_optimizer(name, _grad_params(model), lr=lr, **options)
        self.wire = "1 bit per coordinate (majority vote)" if name in VOTE_METHODS else "none"

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=False)

    def step(self):
        self.opt.step()
        stats = getattr(self.opt, "stats", None) or {}
        out = _zero_stats()
        for k in STAT_KEYS:
            if k in stats and stats[k] is not None:
                out[k] = stats[k]
        return out


# ---------------------------------------------------------------------------------------
def _base_optimizer(name, params, lr, beta, weight_decay):
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=1.0 - beta, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(1.0 - beta, 0.999),
                                 weight_decay=weight_decay)
    # compressor methods: an EMA of the voted +-1 tensors, v = (1-beta) v + beta o
    mu = 1.0 - beta
    return torch.optim.SGD(params, lr=lr, momentum=mu, dampening=mu,
                           weight_decay=weight_decay)


class MPIAllreduceMethod:
    """SGDM / AdamW with gradients averaged by one fp32 Allreduce per step (mpi4py via
    ``signcomm.comm.MPITransport``; the ledger counts the ring-allreduce bytes)."""

    wire = "fp32 allreduce (mpi4py)"

    def __init__(self, name, model, cluster, *, lr, beta, weight_decay):
        self.params = _grad_params(model)
        self.opt = _base_optimizer(name, self.params, lr, beta, weight_decay)
        self.transport = cluster.new_transport() if cluster.size > 1 else None
        self.n = cluster.size

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=False)

    def step(self):
        out = _zero_stats()
        if self.transport is not None:
            grads = [p.grad for p in self.params]
            t0 = time.perf_counter()
            flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
            summary_before = self.transport.ledger.total.bytes_sent, \
                self.transport.ledger.total.bytes_received
            summed = self.transport.allreduce(flat, "sum")
            avg = torch.from_numpy(np.asarray(summed)).div_(self.n)
            pos = 0
            for g in grads:
                k = g.numel()
                g.copy_(avg[pos:pos + k].view_as(g))
                pos += k
            out["comm_s"] = time.perf_counter() - t0
            out["bytes_sent"] = self.transport.ledger.total.bytes_sent - summary_before[0]
            out["bytes_received"] = self.transport.ledger.total.bytes_received - summary_before[1]
        t0 = time.perf_counter()
        self.opt.step()
        out["update_s"] = time.perf_counter() - t0
        return out


def _compressor(name, seed, named_parameters):
    """A fresh compressor of ``compressors`` for ``hvd-sign|sr|s1`` (its own step counter
    and the run's seed), or ``compressors.Compression.<kind>`` when the classes are not
    there."""
    kind = name.split("-", 1)[1]
    try:
        import compressors
    except ImportError as exc:
        raise MethodError(f"{name} needs the compressors package, which does not import "
                          f"({exc})")
    cls = getattr(compressors, {"sign": "SignCompressor", "sr": "SRCompressor",
                                "s1": "S1Compressor"}[kind], None)
    if cls is not None:
        return cls(seed=seed, named_parameters=named_parameters)
    comp = getattr(getattr(compressors, "Compression", None), kind, None)
    if comp is None:
        raise MethodError(f"{name} needs compressors.Compression.{kind}, which this checkout "
                          "does not have yet")
    return comp


class _Metered:
    """Wraps a Horovod compressor: times compress/decompress and adds up the bytes of
    what compress hands to Horovod's allreduce (the wire payload)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n
        self.reset()

    def reset(self):
        self.compress_s = self.decompress_s = 0.0
        self.payload_bytes = 0

    def compress(self, tensor):
        stats = getattr(self.inner, "stats", None)
        before = stats.get("wire_bytes") if isinstance(stats, dict) else None
        t0 = time.perf_counter()
        out, ctx = self.inner.compress(tensor)
        self.compress_s += time.perf_counter() - t0
        if before is not None:  # every message, also those the compressor sends itself
            wire = self.inner.stats["wire_bytes"] - before
        else:
            wire = out.numel() * out.element_size()
        self.payload_bytes += ring_allreduce_bytes(wire, self.n)
        return out, ctx

    def decompress(self, tensor, ctx):
        t0 = time.perf_counter()
        out = self.inner.decompress(tensor, ctx)
        self.decompress_s += time.perf_counter() - t0
        return out


class HorovodMethod:
    """An unmodified ``hvd.DistributedOptimizer``: fp32 (``Compression.none``) for SGDM /
    AdamW, or one of the signcomm compressors.  Allreduces start during backward (hooks);
    ``step`` waits for them (``synchronize``: communication, plus decompress = the vote for
    the compressors) and then applies the base optimizer (update).  Bytes per step are
    the ring-allreduce bytes of the tensors handed to Horovod."""

    def __init__(self, name, model, cluster, *, lr, beta, weight_decay, seed=0):
        hvd = cluster.hvd
        if hvd is None:
            raise MethodError(f"{name} runs through hvd.DistributedOptimizer: launch with "
                              "horovodrun, or pass --transport horovod")
        params = _grad_params(model)
        base = _base_optimizer(name, params, lr, beta if beta is not None else 1.0, weight_decay)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if name in COMPRESSOR_METHODS:
            inner = _compressor(name, seed, named)
            self.wire = f"compressors.Compression.{name.split('-', 1)[1]} via hvd allreduce"
        else:
            inner = hvd.Compression.none
            self.wire = "fp32 allreduce (Horovod)"
        self.meter = _Metered(inner, cluster.size)
        self.opt = hvd.DistributedOptimizer(base, named_parameters=named,
                                            compression=self.meter)
        self.single = cluster.size == 1

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        out = _zero_stats()
        t0 = time.perf_counter()
        self.opt.synchronize()
        sync = time.perf_counter() - t0
        t0 = time.perf_counter()
        with self.opt.skip_synchronize():
            self.opt.step()
        out["update_s"] = time.perf_counter() - t0
        out["compress_s"] = self.meter.compress_s
        out["vote_s"] = self.meter.decompress_s
        out["comm_s"] = max(0.0, sync - self.meter.decompress_s)
        out["bytes_sent"] = out["bytes_received"] = self.meter.payload_bytes
        self.meter.reset()
        return out


# ---------------------------------------------------------------------------------------
def create(name, model, cluster, *, lr, beta, schedule=None, seed=0, byzantine=False,
           weight_decay=0.0):
    """The method object for ``name`` on this rank (``byzantine``: this rank is faulty)."""
    fam = family(name)
    if fam == "single" and cluster.size > 1:
        raise MethodError(f"{name} is the single-process method: run it as one process "
                          f"(python mpi_examples/train.py), or use its majority-vote form "
                          f"({name}-mv) on {cluster.size} ranks")
    if fam in ("vote", "single"):
        return SignCommMethod(name, model, cluster, lr=lr, beta=beta, schedule=schedule,
                              seed=seed, byzantine=byzantine, weight_decay=weight_decay)
    if schedule is not None:
        raise MethodError(f"--schedule applies to the majority-vote methods, not to {name}")
    if fam == "compressor" or cluster.engine == "horovod":
        return HorovodMethod(name, model, cluster, lr=lr, beta=beta, weight_decay=weight_decay,
                             seed=seed)
    return MPIAllreduceMethod(name, model, cluster, lr=lr, beta=beta, weight_decay=weight_decay)


def fp32_allreduce_bytes(num_params: int, n: int) -> int:
    """What one fp32 ring allreduce of the gradients sends (= receives) per rank."""
    return ring_allreduce_bytes(4 * num_params, n) if n > 1 else 0
