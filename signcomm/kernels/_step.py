"""numba kernels of the optimizer step around the vote: the momentum pass before S_R and
the update after the vote, each one pass over memory (``signcomm.optim.majority`` uses
them; no torch here, they run on NumPy views of CPU tensors).

- ``momentum_pass``: v_new = lerp(v, g, w) (eq. 9 with w = beta), or v_new = g, or
  v_new = g * w (the first step), written to a separate buffer (the caller commits it
  only after the vote), and in the same pass max |g| and max |v_new| as the bit
  patterns of |x| (non-negative floats order as their bits, NaN above inf), so one
  integer max gives both the finite check of the gradient and R's local max.
- ``apply_signs``: x <- x * c (decoupled weight decay, optional) then x <- x + alpha * o
  with o = +1 / -1 read straight from the packed vote bits (0 where a tie mask says so),
  alpha = -lr: no float copy of the vote.

Rounding is that of torch's CPU kernels, so results stay bit-identical to
``v.lerp_(g, w)``, ``p.mul_(c)`` and ``p.add_(o, alpha=-lr)``:
- torch's lerp (``ATen/native/cpu/LerpKernel.cpp``, vectorised) is one fused multiply-add:
  ``fma(w, g - v, v)`` for |w| < 0.5, ``fma(w - 1, g - v, g)`` otherwise, in fp32
  (``llvm.fma`` here: exact on every CPU, vectorised where the CPU has FMA).  A CPU build
  of torch without FMA rounds twice; ``signcomm.optim.majority`` checks torch once
  against this kernel and falls back to torch's lerp if they differ.
- ``add_(o, alpha)`` is ``fma(o, alpha, x)``; alpha * o is exact (o = +1, -1 or +-0), so
  it is x + (+-alpha), or x + (+-0).  ``mul_`` is a plain fp32 product (not fused with
  the add: numba does not contract without fastmath).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu import pick_kernel

LANE_BITS = np.uint64(0x8040201008040201)
LANE_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
LANE_ONES = np.uint64(0x0101010101010101)
ABS_MASK = np.uint32(0x7FFFFFFF)

CHUNK = 1 << 15          # coordinates per parallel task (multiple of 64)
PARALLEL_MIN = 1 << 18   # below this many coordinates a call runs on the calling thread

MODE_LERP, MODE_COPY, MODE_SCALE = 0, 1, 2

jit = numba.njit(cache=True, nogil=True)
pjit = numba.njit(cache=True, nogil=True, parallel=True)


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c in fp32 with one rounding (LLVM's fma intrinsic)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3),
                                            "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _abs_bits(typingctx, x):
    """The bit pattern of |x| for an fp32 x, as uint32 (orders like |x|; NaN > inf)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        i = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(i, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return sig, codegen


@jit
def _momentum_range(v, g, out, w, mode):
    """One contiguous range; returns (max |g| bits, max |out| bits)."""
    m = out.shape[0]
    gmax = np.uint32(0)
    vmax = np.uint32(0)
    if mode == MODE_LERP:
        if abs(w) < 0.5:  # torch: fma(w, g - v, v)
            for k in range(m):
                gk = g[k]
                x = _fma32(w, gk - v[k], v[k])
                out[k] = x
                gmax = max(gmax, _abs_bits(gk))
                vmax = max(vmax, _abs_bits(x))
        else:  # torch: fma(w - 1, g - v, g)
            c = w - np.float32(1.0)
            for k in range(m):
                gk = g[k]
                x = _fma32(c, gk - v[k], gk)
                out[k] = x
                gmax = max(gmax, _abs_bits(gk))
                vmax = max(vmax, _abs_bits(x))
    elif mode == MODE_COPY:
        for k in range(m):
            gk = g[k]
            out[k] = gk
            gmax = max(gmax, _abs_bits(gk))
        vmax = gmax
    else:  # MODE_SCALE: g * w, one fp32 product (torch's g * beta)
        for k in range(m):
            gk = g[k]
            x = gk * w
            out[k] = x
            gmax = max(gmax, _abs_bits(gk))
            vmax = max(vmax, _abs_bits(x))
    return gmax, vmax


@jit
def momentum_serial(v, g, out, w, mode):
    return _momentum_range(v, g, out, w, mode)


@pjit
def momentum_parallel(v, g, out, w, mode):
    d = out.shape[0]
    nchunks = (d + CHUNK - 1) // CHUNK
    gm = np.zeros(nchunks + 1, np.uint32)  # + 1: d = 0 has a max too (0)
    vm = np.zeros(nchunks + 1, np.uint32)
    for c in numba.prange(nchunks):
        i0 = c * CHUNK
        i1 = min(i0 + CHUNK, d)
        a, b = _momentum_range(v[i0:i1], g[i0:i1], out[i0:i1], w, mode)
        gm[c] = a
        vm[c] = b
    return gm.max(), vm.max()


def momentum_pass(v, g, out, w, mode):
    """out <- lerp(v, g, w) (mode 0), g (mode 1) or g * w (mode 2), all flat fp32 of one
    length (``v`` is ignored but for mode 0).  Returns (max |g|, max |out|) as uint32 bit
    patterns: a value >= 0x7F800000 means a NaN/Inf is present."""
    kernel = pick_kernel(momentum_parallel, momentum_serial, out.shape[0], PARALLEL_MIN)
    return kernel(v, g, out, np.float32(w), mode)


@jit
def _spread8(b):
    """Byte b -> uint64 whose byte k is bit k of b (0 or 1)."""
    x = (np.uint64(b) * LANE_ONES) & LANE_BITS
    return ((x + LANE_LOW7) >> np.uint64(7)) & LANE_ONES


@jit
def _spread_bits(bits, j0, m, flags):
    """flags[s + k] = bit j0 + k of bits for k < m, with s = j0 % 8 (returned)."""
    q0 = j0 >> 3
    s = j0 & 7
    nb = (s + m + 7) >> 3
    fw = flags.view(np.uint64)
    for q in range(nb):
        fw[q] = _spread8(bits[q0 + q])
    return s


@jit
def _apply_range(x, bits, nonzero, j0, alpha, c, decay, fb, fz):
    """x[k] <- x[k] (* c) + alpha * o_k for the coordinates whose vote bits start at bit
    j0; o_k = +1 (bit 1) / -1 (bit 0), times the nonzero bit when a mask is given."""
    m = x.shape[0]
    s = _spread_bits(bits, j0, m, fb)
    neg = alpha           # alpha * (+1)
    pos = -alpha          # alpha * (-1)
    fs = fb[s:s + m]
    if nonzero.shape[0] == 0:
        if decay:
            for k in range(m):
                x[k] = x[k] * c + (neg if fs[k] else pos)
        else:
            for k in range(m):
                x[k] = x[k] + (neg if fs[k] else pos)
    else:
        # o = (2 bit - 1) * nz as torch's decoded floats: a masked coordinate is -0.0 (bit
        # 0) or +0.0 (bit 1), and alpha < 0 makes alpha * o +0.0 or -0.0
        zpos = np.float32(0.0) * alpha * np.float32(-1.0)   # alpha * -0.0 = +0.0
        zneg = np.float32(0.0) * alpha                      # alpha * +0.0 = -0.0
        _spread_bits(nonzero, j0, m, fz)
        zs = fz[s:s + m]
        for k in range(m):
            y = x[k] * c if decay else x[k]
            if zs[k]:
                x[k] = y + (neg if fs[k] else pos)
            else:
                x[k] = y + (zneg if fs[k] else zpos)


@jit
def apply_serial(x, bits, nonzero, j0, alpha, c, decay):
    d = x.shape[0]
    nf = (min(d, CHUNK) + 23) & ~7  # flags of a chunk and its first byte's offset
    fb = np.empty(nf, np.uint8)
    fz = np.empty(nf if nonzero.shape[0] else 0, np.uint8)
    for i0 in range(0, d, CHUNK):
        i1 = min(i0 + CHUNK, d)
        _apply_range(x[i0:i1], bits, nonzero, j0 + i0, alpha, c, decay, fb, fz)


@pjit
def apply_parallel(x, bits, nonzero, j0, alpha, c, decay):
    d = x.shape[0]
    nchunks = (d + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        i0 = ch * CHUNK
        i1 = min(i0 + CHUNK, d)
        fb = np.empty(CHUNK + 16, np.uint8)
        fz = np.empty(CHUNK + 16 if nonzero.shape[0] else 0, np.uint8)
        _apply_range(x[i0:i1], bits, nonzero, j0 + i0, alpha, c, decay, fb, fz)


def apply_signs(x, bits, j0, alpha, *, nonzero=None, decay=None):
    """In place on the flat fp32 array x: ``x <- x * decay`` (if given, one fp32 product)
    then ``x <- x + alpha * o`` with o_k = +1 where bit j0 + k of the packed ``bits`` is 1,
    else -1, and times bit j0 + k of ``nonzero`` when given (a tie under tie="zero").
    ``alpha`` is the fp32 step, normally -lr (must be < 0 for the signed-zero rule of
    masked coordinates to match torch)."""
    nz = _EMPTY if nonzero is None else nonzero
    c = np.float32(1.0 if decay is None else decay)
    kernel = pick_kernel(apply_parallel, apply_serial, x.shape[0], PARALLEL_MIN)
    kernel(x, bits, nz, j0, np.float32(alpha), c, decay is not None)


_EMPTY = np.zeros(0, np.uint8)
