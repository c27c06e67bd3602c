"""The optimizer-step kernels of ``signcomm.kernels._step`` against torch's own CPU ops,
bit for bit: the fused momentum pass is ``torch.lerp`` (or a copy, or ``g * beta``) plus
max |g| and max |v| in one pass; the update from packed vote bits is ``p.mul_(1 - lr wd)``
then ``p.add_(o, alpha=-lr)`` on the decoded +1/-1 (and 0) floats.  Serial and parallel
versions of each kernel are checked (the parallel one runs in chunks of ``CHUNK``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from signcomm.kernels import _step as S
from signcomm.backends import fused_lerp_ok as _fused_lerp_ok

SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 4099, 2 * S.CHUNK + 13]


def _data(n, seed):
    g = np.random.default_rng(seed)
    scale = 10.0 ** g.integers(-4, 5, n)
    return ((g.standard_normal(n) * scale).astype(np.float32),
            (g.standard_normal(n) * scale).astype(np.float32))


def _same(a, b):
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def _bits(x):
    return int(np.abs(x).max().view(np.uint32)) if x.size else 0


@pytest.mark.parametrize("kernel", [S.momentum_serial, S.momentum_parallel])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("w", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_momentum_pass_is_torch_lerp(kernel, n, w):
    if not _fused_lerp_ok():
        pytest.skip("this torch build's lerp does not fuse the multiply-add; the optimizer uses torch's")
    v, g = _data(n, n + int(100 * w))
    out = np.full(n, np.nan, np.float32)
    gm, vm = kernel(v, g, out, np.float32(w), S.MODE_LERP)
    ref = torch.lerp(torch.from_numpy(v), torch.from_numpy(g), w).numpy()
    assert _same(out, ref)
    assert int(gm) == _bits(g) and int(vm) == _bits(ref)
    inplace = torch.from_numpy(v.copy()).lerp_(torch.from_numpy(g), w).numpy()
    assert _same(out, inplace)


@pytest.mark.parametrize("kernel", [S.momentum_serial, S.momentum_parallel])
@pytest.mark.parametrize("n", SIZES)
def test_momentum_pass_first_step_modes(kernel, n):
    v, g = _data(n, n)
    out = np.empty(n, np.float32)
    gm, vm = kernel(v, g, out, np.float32(0.1), S.MODE_COPY)
    assert _same(out, g) and int(gm) == int(vm) == _bits(g)
    gm, vm = kernel(v, g, out, np.float32(0.1), S.MODE_SCALE)
    ref = (torch.from_numpy(g) * 0.1).numpy()  # the optimizer's v_1 = beta g_1 (zero init)
    assert _same(out, ref) and int(gm) == _bits(g) and int(vm) == _bits(ref)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_momentum_pass_flags_nonfinite_gradients(bad):
    v, g = _data(1000, 3)
    g[517] = bad
    out = np.empty_like(v)
    gm, vm = S.momentum_pass(v, g, out, 0.1, S.MODE_LERP)
    assert gm >= 0x7F800000 and vm >= 0x7F800000
    gm, _ = S.momentum_pass(v, _data(1000, 4)[1], out, 0.1, S.MODE_LERP)
    assert gm < 0x7F800000


def _torch_update(x, o, lr, wd):
    p = torch.from_numpy(x.copy())
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(torch.from_numpy(o), alpha=-lr)
    return p.numpy()


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("n", SIZES[1:])
@pytest.mark.parametrize("j0", [0, 3, 8, 13])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("mask", [False, True])
def test_apply_signs_is_torch_update(kernel, n, j0, wd, mask):
    g = np.random.default_rng(n + j0)
    x = g.standard_normal(n).astype(np.float32)
    x[: min(4, n)] = np.array([0.0, -0.0, 1e-30, -1.0], np.float32)[: min(4, n)]
    d = j0 + n + 5
    bits = g.integers(0, 256, (d + 7) // 8, dtype=np.uint8)
    nz = g.integers(0, 256, (d + 7) // 8, dtype=np.uint8) if mask else None
    lr = 0.0123
    o = np.unpackbits(bits, bitorder="little", count=d).astype(np.float32) * 2 - 1
    if mask:  # as Vote.values decodes it: (2 bit - 1) * nonzero, so -0.0 or +0.0 on ties
        o *= np.unpackbits(nz, bitorder="little", count=d).astype(np.float32)
    ref = _torch_update(x, o[j0:j0 + n], lr, wd)
    y = x.copy()
    fn = S.apply_serial if kernel == "serial" else S.apply_parallel
    fn(y, bits, S._EMPTY if nz is None else nz, j0, np.float32(-lr),
       np.float32(1 - lr * wd), bool(wd))
    assert _same(y, ref)
    z = x.copy()
    S.apply_signs(z, bits, j0, np.float32(-lr), nonzero=nz, decay=(1 - lr * wd) if wd else None)
    assert _same(z, ref)
