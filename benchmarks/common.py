"""What the benchmarks share: the timing loop, byte formulas, and the fp32 and SGD
baselines.

Importing this module puts the checkout on ``sys.path``, so ``python benchmarks/x.py``
measures this checkout's ``signcomm``. It imports no numba, torch, mpi4py or Horovod
itself: the benchmarks set their thread counts before those load (``pin_threads``).

- threads: ``local_ranks``, ``threads_per_rank``, ``pin_threads``;
- timing: ``clock`` (one call), ``Stopwatch`` (time spent inside wrapped calls),
  ``Method`` + ``interleave`` (several things timed in turns, so load swings hit them
  alike), ``median_of_max`` (per repeat the slowest rank, then the median);
- names and bytes, as the library defines them (docs/algorithms.md):
  ``vote_vocabulary`` (schedule, variant and tie-rule names), ``ring_allreduce_bytes``,
  ``fp32_allreduce_bytes``, ``count_field_words``, ``random_packed``;
- parameter sets: ``BLOCK_SHAPES`` (16 tensors shaped like ResNet-50's largest layers),
  ``resnet50_shapes`` (torchvision's 161), ``scaled_shapes`` (``--scale``);
- baselines: ``mpi_fp32_allreduce`` and ``hvd_allreduce`` (the allreduce that plain data
  parallelism does instead of the vote), ``MpiSGD`` and ``hvd_sgd`` (SGD over an fp32
  allreduce, through mpi4py or Horovod's DistributedOptimizer), ``mlp`` (the model of
  the step benchmarks).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from signcomm.comm import ring_allreduce_bytes  # noqa: E402  (no numba, torch or MPI)

__all__ = [
    "ROOT", "local_ranks", "threads_per_rank", "pin_threads", "clock", "Stopwatch", "Method", "interleave",
    "median_of_max", "vote_vocabulary", "ring_allreduce_bytes", "fp32_allreduce_bytes",
    "count_field_words", "random_packed", "mpi_fp32_allreduce", "hvd_allreduce", "MpiSGD",
    "hvd_sgd", "mlp", "BLOCK_SHAPES", "resnet50_shapes", "scaled_shapes",
]


# -- parameter sets -----------------------------------------------------------------------

# 25,640,960 parameters in 16 tensors shaped like ResNet-50's largest layers: the
# (1000, 2048) classifier, six (512, 512, 3, 3) and nine (2048, 512, 1, 1) convolutions.
BLOCK_SHAPES = [(1000, 2048)] + [(512, 512, 3, 3)] * 6 + [(2048, 512, 1, 1)] * 9


def scaled_shapes(shapes, scale: float):
    """``shapes`` with each first dimension times ``scale`` (at least 1): a smaller set of
    the same layout for smoke runs; ``scale=1.0`` gives ``shapes`` unchanged."""
    if scale == 1.0:
        return list(shapes)
    return [(max(1, int(s[0] * scale)),) + tuple(s[1:]) for s in shapes]


def resnet50_shapes():
    """The parameter shapes of torchvision's resnet50(), in order (no torchvision needed)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:  # downsample: 1x1 conv + batch norm
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


# -- threads ------------------------------------------------------------------------------

def local_ranks() -> int:
    """Ranks on this host, from the launcher's environment (1 outside a launcher)."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def threads_per_rank(ranks: int | None = None) -> int:
    """The cores divided among ``ranks`` (default: ``local_ranks()``), at least 1."""
    return max(1, (os.cpu_count() or 1) // (ranks or local_ranks()))


def pin_threads(ranks: int | None = None, threads: int | None = None) -> int:
    """Compute threads per rank: ``threads``, else ``threads_per_rank(ranks)``. Sets
    ``NUMBA_NUM_THREADS`` and ``OMP_NUM_THREADS`` unless the user set them. Call it
    before numba or torch is imported; it returns the thread count, for
    ``torch.set_num_threads``."""
    if threads is None:
        threads = threads_per_rank(ranks)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    return threads


# -- timing -------------------------------------------------------------------------------

def clock(fn, *args, sync=None) -> float:
    """Seconds of one call ``fn(*args)``. ``sync`` (e.g. a CUDA device synchronize) runs
    before and after, inside the timing, so asynchronous work is counted."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn(*args)
    if sync is not None:
        sync()
    return time.perf_counter() - t0


class Stopwatch:
    """Adds up the time spent inside the calls it wraps (``wrap(fn)``): ``seconds`` of
    wall time, ``cpu_seconds`` of the calling thread's CPU time; ``reset()``."""

    def __init__(self):
        self.seconds = self.cpu_seconds = 0.0

    def reset(self):
        self.seconds = self.cpu_seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.thread_time() - c0
        return timed


class Method:
    """One thing to time: ``fn(i)`` for repeat i, with untimed ``before(i)`` and
    ``after(i)`` hooks. ``interleave`` appends the timed repeats to ``times``."""

    def __init__(self, fn, before=None, after=None, name=None):
        self.fn, self.before, self.after, self.name = fn, before, after, name
        self.times = []

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleave(methods, repeat: int, warmup: int = 0, *, barrier=None, allmax=None,
               rotate: bool = False, sync=None):
    """Time every method ``warmup + repeat`` times, in turns: repeat i runs each method
    once (with ``rotate`` the first one moves on with i), so a swing in the machine's load
    hits all of them alike. Before each timed call ``barrier()`` lines the ranks up. A
    call's time is ``allmax(seconds)`` (the slowest rank's) when given. The first
    ``warmup`` repeats are not recorded (numba compilation, first-touch page faults).
    Returns ``methods``."""
    methods = list(methods)
    for i in range(warmup + repeat):
        k = i % len(methods) if rotate else 0
        for m in methods[k:] + methods[:k]:
            if m.before:
                m.before(i)
            if barrier is not None:
                barrier()
            dt = clock(m.fn, i, sync=sync)
            if allmax is not None:
                dt = allmax(dt)
            if m.after:
                m.after(i)
            if i >= warmup:
                m.times.append(dt)
    return methods


def median_of_max(allmax, samples) -> float:
    """Per repeat the max over ranks (``allmax`` maps a float64 vector to its element-wise
    max over ranks), then the median over repeats: the slowest rank sets the pace."""
    import numpy as np
    return float(np.median(allmax(np.asarray(samples, np.float64))))


# -- names and bytes ----------------------------------------------------------------------

def vote_vocabulary():
    """``(schedules, variants, tie rules)`` as the library names them. This imports the
    kernels (numba), so call it after ``pin_threads``."""
    from signcomm import kernels as K
    from signcomm.vote import SCHEDULES
    return tuple(SCHEDULES), tuple(K.VARIANTS), tuple(K.TIE_RULES)


def fp32_allreduce_bytes(d: int, n: int, itemsize: int = 4) -> int:
    """Bytes each rank sends (and receives) in a ring allreduce of d floats (fp32; 2 for
    fp16): the baseline every schedule is compared with."""
    return ring_allreduce_bytes(itemsize * int(d), n)


def count_field_words(d: int, n: int) -> int:
    """int64 words of the packed-count allreduce for d coordinates on n ranks
    (``ceil(log2(n+1))``-bit fields, ``63 // b`` per word)."""
    from signcomm import kernels as K
    return K.count_field_words(int(d), K.count_field_bits(n))


def random_packed(d: int, gen, rows: int | None = None):
    """Uniform random packed bits for d coordinates (``rows`` of them, or one vector) from
    the NumPy generator ``gen``, padding cleared: what S_R sends when |v| << R."""
    import numpy as np

    from signcomm import kernels as K
    shape = (K.packed_nbytes(d),) if rows is None else (rows, K.packed_nbytes(d))
    packed = gen.integers(0, 256, size=shape, dtype=np.uint8)
    for row in (packed,) if rows is None else packed:
        K.clear_padding(row, d)
    return packed


# -- baselines ----------------------------------------------------------------------------

def mpi_fp32_allreduce(comm, x):
    """The mpi4py fp32 baseline: ``fn(i)`` that SUM-allreduces the float32 array ``x`` into
    a preallocated buffer."""
    import numpy as np
    from mpi4py import MPI
    out = np.empty_like(x)
    return lambda i=0: comm.Allreduce(x, out, op=MPI.SUM)


def hvd_allreduce(hvd, tensor, name, compression=None):
    """The Horovod baseline: ``fn(i)`` that SUM-allreduces ``tensor`` (with Horovod's
    ``compression``, e.g. ``hvd.Compression.fp16``) under a name unique per call."""
    kwargs = {} if compression is None else {"compression": compression}
    return lambda i=0: hvd.allreduce(tensor, op=hvd.Sum, name=f"{name}.{i}", **kwargs)


class MpiSGD:
    """SGD with momentum over one mpi4py fp32 allreduce of the flat gradient: what data
    parallelism does without signcomm. ``step()`` averages the gradients over ranks and
    steps; ``comm_seconds`` is the last allreduce's time."""

    def __init__(self, comm, params, lr=1e-4, momentum=0.9):
        import torch
        self.comm = comm
        self.params = [p for p in params]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        d = sum(p.numel() for p in self.params)
        self.flat, self.summed = torch.zeros(d), torch.zeros(d)
        self.comm_seconds = 0.0

    def step(self):
        import torch
        from mpi4py import MPI
        torch.cat([p.grad.reshape(-1) for p in self.params], out=self.flat)
        t0 = time.perf_counter()
        self.comm.Allreduce(self.flat.numpy(), self.summed.numpy(), op=MPI.SUM)
        self.comm_seconds = time.perf_counter() - t0
        self.summed.div_(self.comm.Get_size())
        off = 0
        for p in self.params:
            k = p.numel()
            p.grad.copy_(self.summed[off:off + k].view_as(p))
            off += k
        self.opt.step()


def hvd_sgd(hvd, named_parameters, lr=1e-4, momentum=0.0, compression=None):
    """SGD through ``hvd.DistributedOptimizer`` (an fp32 allreduce per gradient, or
    ``compression``), the way an existing Horovod job trains."""
    import torch
    named = list(named_parameters)
    kwargs = {} if compression is None else {"compression": compression}
    return hvd.DistributedOptimizer(
        torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum),
        named_parameters=named, **kwargs)


def mlp(width: int, depth: int, classes: int | None = None, seed: int = 0):
    """``depth`` square (Linear, ReLU) layers of ``width``, then a Linear to ``classes``
    when given; weights from ``torch.manual_seed(seed)``."""
    import torch
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    if classes is not None:
        layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)
