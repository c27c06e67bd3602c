"""Who we are in the job and how we talk: the engine (MPI through mpi4py, or Horovod),
rank and size, and an auxiliary transport for the example's own bookkeeping
(broadcast of the initial model, evaluation sums, per-epoch statistics).

The auxiliary transport has its own byte ledger, so evaluation traffic never shows up in
a method's bytes.  Nothing here imports Horovod unless the Horovod engine is chosen.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ENGINES = ("auto", "mpi", "horovod")


def launched_by_horovodrun() -> bool:
    """Whether horovodrun started this process.

    horovodrun sets no variable of its own in MPI mode: it replaces itself with
    ``mpirun ... -genv NCCL_SOCKET_IFNAME=<nics> ...`` (Horovod 0.28, mpi_run.py), so that
    variable is the sign; in Gloo mode it sets ``HOROVOD_RANK`` and stays the ranks'
    ancestor.  A plain mpirun job that exports NCCL_SOCKET_IFNAME itself is taken for
    horovodrun too: pass ``--transport mpi`` then."""
    if "HOROVOD_RANK" in os.environ or "NCCL_SOCKET_IFNAME" in os.environ:
        return True
    pid = os.getppid()
    for _ in range(16):
        if pid <= 1:
            return False
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if any(Path(part.decode(errors="replace")).name == "horovodrun" for part in cmd[:3]):
            return True
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def env_rank() -> int:
    """This process's rank from the launcher's environment (before MPI is touched)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "HOROVOD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def env_local_size() -> int:
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def default_thread_env():
    """Ranks on one machine share its cores: unless told otherwise, let each rank's
    thread pools (OpenMP/torch, numba) use cores // local ranks threads (at least one).
    Must run before torch or numba is imported."""
    threads = str(max(1, (os.cpu_count() or 1) // env_local_size()))
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, threads)


def set_compute_threads():
    """Ranks on one machine share its cores: give torch cores // local ranks threads
    (at least one) unless OMP_NUM_THREADS says otherwise."""
    import torch
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env_local_size()))


class Cluster:
    """The engine of this job and an auxiliary transport (``aux``) for bookkeeping."""

    def __init__(self, engine: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"--transport must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "auto":
            engine = "horovod" if launched_by_horovodrun() else "mpi"
        self.engine = engine
        self.hvd = None
        if engine == "horovod":
            try:
                import horovod.torch as hvd
            except ImportError as exc:
                raise RuntimeError(f"--transport horovod needs horovod.torch ({exc}); run "
                                   "`make setup`, or launch with mpirun and --transport mpi")
            hvd.init()
            self.hvd = hvd
        self.aux = self.new_transport()

    def new_transport(self):
        """A fresh transport on this engine, with its own ledger."""
        from signcomm.comm import get_transport
        return get_transport(self.engine)

    @property
    def rank(self) -> int:
        return self.aux.rank

    @property
    def size(self) -> int:
        return self.aux.size

    # -- bookkeeping collectives (float64 sums / maxima of small vectors) ----------------
    def allreduce(self, values, op="sum") -> np.ndarray:
        buf = np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))
        if self.size == 1:
            return buf.copy()
        return np.asarray(self.aux.allreduce(buf, op))

    def broadcast_model(self, model):
        """Rank 0's parameters and buffers on every rank (one message)."""
        import torch
        if self.size == 1:
            return
        tensors = [t for t in list(model.parameters()) + list(model.buffers())]
        if not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()
            out = np.asarray(self.aux.broadcast(flat, 0))
            pos = 0
            for t in tensors:
                k = t.numel()
                t.copy_(torch.from_numpy(out[pos:pos + k]).reshape(t.shape).to(t.dtype))
                pos += k

    def average_buffers(self, model):
        """Average floating-point buffers (BatchNorm running statistics) over ranks, so
        that evaluation uses one model on every rank; integer buffers (batch counters)
        are the same on every rank anyway."""
        import torch
        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if self.size == 1 or not bufs:
            return
        with torch.no_grad():
            flat = torch.cat([b.reshape(-1).double() for b in bufs]).numpy()
            out = self.allreduce(flat) / self.size
            pos = 0
            for b in bufs:
                k = b.numel()
                b.copy_(torch.from_numpy(out[pos:pos + k]).reshape(b.shape).to(b.dtype))
                pos += k
