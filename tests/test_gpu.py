"""CUDA tensors end to end (run by scripts/gpu_check.sh on a machine with a GPU; skipped
elsewhere).  The contract (docs/engine.md, "CUDA"):

- every kernel of the torch backend on CUDA gives the numba kernels' bits
  (tests/test_torch_backend.py::test_parity_suite_cuda);
- ``MVSM`` on CUDA parameters (backend "auto" = torch) equals the CPU run bit for bit for
  the methods without momentum arithmetic (beta = 1); with momentum, CUDA's lerp may
  round differently from the CPU's fused multiply-add: then the bits drawn from the same
  momentum must still match (checked here), and the parameters may differ only where
  the momentum did;
- the same over 2 ranks sharing the GPU through mpirun: ranks identical.
"""
import numpy as np
import pytest
import torch

import signcomm
from harness import launch
from signcomm.backends import get_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch "
                                          "(scripts/gpu_check.sh runs these on one)")]

EXACT = ("sto-signsgd", "signsgd-mv")   # beta = 1: no lerp, CUDA must equal CPU exactly


def lerp_rounds_alike(n=100_003):
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return all(torch.equal(torch.lerp(v, x, w), torch.lerp(v.cuda(), x.cuda(), w).cpu())
               for w in (0.1, 0.5, 0.7))


def run(method, device, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.ReLU(), torch.nn.Linear(65, 7))
    model.to(device)
    opt = signcomm.create_optimizer(method, model.parameters(), lr=0.01, transport="mpi", seed=4,
                                    bucket_elements=1000)
    g = torch.Generator().manual_seed(1)
    traj = []
    for _ in range(steps):
        x, y = torch.randn(16, 33, generator=g), torch.randint(0, 7, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        traj.append(torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]))
    return torch.stack(traj), opt


@pytest.mark.parametrize("method", ["sto-signsgd", "signsgd-mv", "mvsm-v1", "mvsm-v2", "signum-mv"])
def test_mvsm_on_cuda_one_rank_equals_cpu(method):
    cpu, _ = run(method, "cpu")
    cuda, opt = run(method, "cuda")
    assert opt.engine.backend(torch.device("cuda")).name == "torch"
    assert all(m.is_cuda for m in opt.engine.layout.flat[0]), "momentum left the GPU"
    if method in EXACT or lerp_rounds_alike():
        assert torch.equal(cpu.view(torch.int32), cuda.view(torch.int32)), method
    else:  # documented: only the lerp may differ; the parameters stay close
        assert (cpu - cuda).abs().max() < 0.1, method


def test_bits_from_the_same_momentum_match_on_cuda():
    """S_R + pack and the vote from the same v on CUDA and CPU: identical bits."""
    cpu, cuda = get_backend("numba"), get_backend("torch")
    gen = np.random.default_rng(5)
    v = (gen.standard_normal(100_003) * 3).astype(np.float32)
    seg = np.array([50_000, 50_003], np.int64)
    r = np.array([2.0, 9.0])
    a, _ = cpu.sr_pack(v, r, seg, 123, 7)
    b, _ = cuda.sr_pack(torch.from_numpy(v).cuda(), r, seg, 123, 7)
    np.testing.assert_array_equal(a, b.cpu().numpy())
    rows = gen.integers(0, 256, (4, a.shape[0]), dtype=np.uint8)
    rule = signcomm.kernels.VoteRule("v1")
    va = cpu.vote(rows, 100_003, rule, 99, 7)
    vb = cuda.vote(torch.from_numpy(rows).cuda(), 100_003, rule, 99, 7)
    np.testing.assert_array_equal(va.bits, vb.bits.cpu().numpy())


def test_mvsm_on_cuda_two_ranks_share_the_gpu():
    job = launch("gpu_mvsm.py", 2, timeout=240)
    for key in list(job[0]):
        if not key.startswith("cuda-"):
            continue
        method = key[5:]
        for r in range(2):
            np.testing.assert_array_equal(job[r][key], job[0][key], err_msg=f"{key}: ranks differ")
        if method in EXACT or lerp_rounds_alike():
            np.testing.assert_array_equal(job[0][key], job[0][f"cpu-{method}"], err_msg=key)
