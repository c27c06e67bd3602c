"""The training example under ``torchrun``: the process group, a ``Cluster`` on
torch.distributed, and the methods that train through ``DistributedDataParallel``.

    torchrun --nproc-per-node 4 mpi_examples/train.py --method mvsm-v1
    torchrun --nproc-per-node 4 mpi_examples/train.py --method ddp-powersgd

Launched by torchrun (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR environment), the
script initialises the default process group (gloo: this example's models stay on the
CPU; NCCL is the backend for CUDA models) and trains through DDP:

- the majority-vote methods (``mvsm-v1`` ... ``mv-sto-signsgd-sim``) with signcomm's
  communication hook (``signcomm.ddp``) and ``torch.optim.SGD(lr)``: bit for bit what
  the optimizer does under mpirun with the same seed and data;
- ``ddp-fp32`` (DDP's own fp32 allreduce), ``ddp-fp16`` (PyTorch's
  ``fp16_compress_hook``) and ``ddp-powersgd`` (PyTorch's PowerSGD hook, rank 4,
  compressing from the third step, the model in one DDP bucket: see DDPMethod) with SGD
  with momentum ``1 - beta``, as ``sgdm``;
- ``sgdm`` / ``adamw`` average the gradients with one fp32 allreduce through
  ``signcomm.comm.TorchDistTransport`` (as under mpirun), ``signum`` / ``signsgd`` run on
  one process, the ``hvd-*`` compressors need Horovod.

Under DDP the hooks run inside ``backward()``: the epoch's ``time_compute_s`` includes the
communication; ``time_comm_s`` etc. are the hook's own figures (signcomm's hook), or 0.
"""
from __future__ import annotations

import os
import time

from mpi_examples import cluster as C
from mpi_examples import methods as M

DDP_BASELINES = ("ddp-fp32", "ddp-fp16", "ddp-powersgd")
METHODS = M.METHODS + DDP_BASELINES
# (lr, beta): the SGDM defaults of methods.DEFAULTS (DDP averages the same fp32 gradients)
DEFAULTS = {name: M.DEFAULTS["sgdm"] for name in DDP_BASELINES}
POWERSGD_RANK = 4
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """torchrun (or anything that sets its environment) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(v in os.environ for v in TORCHRUN_VARS)


def env_rank() -> int:
    """This process's rank from the launcher's environment (torchrun's, or MPI's)."""
    if launched_by_torchrun() and os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    return C.env_rank()


def thread_env():
    """Under torchrun, cores // local ranks threads per rank (before torch and numba)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if launched_by_torchrun() and local.isdigit():
        threads = str(max(1, (os.cpu_count() or 1) // max(1, int(local))))
        for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ.setdefault(var, threads)


def family(method: str) -> str:
    return "ddp" if method in DDP_BASELINES else M.family(method)


def defaults(method: str):
    return DEFAULTS[method] if method in DEFAULTS else M.DEFAULTS[method]


class TorchCluster(C.Cluster):
    """``Cluster`` on torch.distributed: the default process group (initialised here
    from torchrun's environment, gloo for this CPU example), the bookkeeping transport a
    ``TorchDistTransport``."""

    def __init__(self):
        import torch.distributed as dist
        if not dist.is_initialized():
            if launched_by_torchrun():
                dist.init_process_group("gloo")
            else:  # --transport torch as one plain process
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.engine = "torch"
        self.hvd = None
        self.aux = self.new_transport()


def make_cluster(transport: str):
    """The job's cluster: torch.distributed under torchrun (or ``--transport torch``),
    else ``Cluster`` (MPI / Horovod)."""
    if transport == "torch" or (transport == "auto" and launched_by_torchrun()):
        return TorchCluster()
    if launched_by_torchrun():
        raise ValueError(f"launched by torchrun: --transport {transport} does not apply "
                         "(use --transport auto or torch; mpirun/horovodrun for the others)")
    return C.Cluster(transport)


def uses_ddp(method: str, cluster) -> bool:
    """Whether ``method`` trains through DDP on this cluster."""
    return method in DDP_BASELINES or (cluster.engine == "torch" and method in M.VOTE_METHODS)


def create(name, model, cluster, *, lr, beta, schedule=None, seed=0, byzantine=False,
           weight_decay=0.0, R=None, layout=None):
    """The method object (``methods.create``'s interface, plus ``R``); DDP methods have
    ``module``, the DDP model to call forward on."""
    if name in DDP_BASELINES and cluster.engine != "torch":
        raise M.MethodError(f"{name} trains through torch.distributed's DDP: launch with "
                            "torchrun (torchrun --nproc-per-node N mpi_examples/train.py ...)")
    if uses_ddp(name, cluster):
        return DDPMethod(name, model, cluster, lr=lr, beta=beta, schedule=schedule, seed=seed,
                         byzantine=byzantine, weight_decay=weight_decay, R=R, layout=layout)
    return None


class DDPMethod:
    """A model wrapped in ``DistributedDataParallel`` and its optimizer: signcomm's hook
    + ``SGD(lr)`` for the majority-vote methods, DDP's allreduce / fp16 / PowerSGD hooks
    + SGD with momentum for the baselines."""

    def __init__(self, name, model, cluster, *, lr, beta, schedule, seed, byzantine,
                 weight_decay, R, layout=None):
        import torch
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        import signcomm.ddp
        self.name, self.n = name, cluster.size
        params = [p for p in model.parameters() if p.requires_grad]
        self.d = sum(p.numel() for p in params)
        # PyTorch's PowerSGD hook posts its next allreduce from gloo's callback threads, in
        # completion order: with several buckets that order differs across ranks (gloo:
        # "collective mismatch", or a hang with its 2 threads); one bucket avoids it
        cap = {"bucket_cap_mb": 4 * self.d / 2 ** 20 + 1} if name == "ddp-powersgd" else {}
        self.module = DistributedDataParallel(model, **cap)
        self.hook_state = self.powersgd = None
        if name in M.VOTE_METHODS:
            options = dict(seed=seed)
            if M.uses_beta(name) and beta is not None:
                options["beta"] = beta
            if schedule is not None:
                options["schedule"] = schedule
            if R is not None:
                options["R"] = R
            if byzantine:
                options["byzantine"] = True
            options.update(layout or {})   # --hierarchy / --ranks-per-node
            self.hook_state = signcomm.ddp.register(self.module, name, **options)
            # the vote o moves every coordinate by lr; SGD's weight decay on o is the
            # decoupled rule x (1 - lr wd) - lr o (docs/ddp.md)
            self.opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
            self.wire = "1 bit per coordinate (majority vote, signcomm DDP hook)"
            return
        self.opt = torch.optim.SGD(params, lr=lr, momentum=1.0 - beta, weight_decay=weight_decay)
        if name == "ddp-fp16":
            self.module.register_comm_hook(None, default_hooks.fp16_compress_hook)
            self.wire = "fp16 allreduce (DDP fp16_compress_hook)"
        elif name == "ddp-powersgd":
            self.powersgd = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                start_powerSGD_iter=2, random_seed=seed)
            self.module.register_comm_hook(self.powersgd, powerSGD_hook.powerSGD_hook)
            self.wire = f"PowerSGD rank {POWERSGD_RANK} (DDP powerSGD_hook)"
        else:
            self.wire = "fp32 allreduce (DDP)"
        self._compressed = 0

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        out = {k: 0.0 if k.endswith("_s") else 0 for k in M.STAT_KEYS}
        t0 = time.perf_counter()
        self.opt.step()
        out["update_s"] = time.perf_counter() - t0
        if self.hook_state is not None:
            for k in ("compress_s", "comm_s", "vote_s", "bytes_sent", "bytes_received"):
                out[k] = self.hook_state.stats.get(k, out[k])
        elif self.n > 1:
            out["bytes_sent"] = out["bytes_received"] = self.step_bytes()
        return out

    def step_bytes(self) -> int:
        """Ring-allreduce bytes per rank of what the DDP hook allreduced this step."""
        if self.name == "ddp-fp16":
            return M.ring_allreduce_bytes(2 * self.d, self.n)
        if self.name == "ddp-powersgd":
            # PowerSGD counts the elements it allreduces (P, Q and the tensors it does
            # not compress); before start_powerSGD_iter it allreduces the fp32 buckets
            after = int(self.powersgd.total_numel_after_compression)
            moved, self._compressed = after - self._compressed, after
            if moved:
                return M.ring_allreduce_bytes(4 * moved, self.n)
        return M.ring_allreduce_bytes(4 * self.d, self.n)
