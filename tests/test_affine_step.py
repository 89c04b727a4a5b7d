"""affine_step(x, D, A, B, C, seed, step, sample_offset, out) -> x_s = A·x + B·D + C·z on every backend this
machine runs (tests/contract.py), through fastdiff.ops: the whole update to 4·eps(dtype)·(|ref| + 1) of the float64
value, and the noise z the contract's (fd.noise.normal): float32 bit for bit on the CPU build, within 8 ulps
elsewhere. Select one backend with -k, e.g. `-k cuda_emu`."""
import pytest
import torch

import fastdiff as fd
from contract import F32, F64, NOISE_ULPS, backend_dtypes, device, gen, step_tol
from fastdiff import ops


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, d", [(301, 7), (5, 1030), (999, 2)])
def test_affine_step_noise_is_the_contract(backend, dtype, M, d):
    """Box–Muller in float64 from the float32 uniforms with the reference's angle fl64(2π·u), then rounded; the
    update out of place, in place (out = x), and C = 0 draws nothing."""
    seed, step, off = 2**40 + 5, 17, 2**33
    dev = device(backend)
    zero = torch.zeros(M, d, dtype=dtype, device=dev)
    zk = ops.affine_step(zero, zero, 1.0, 0.0, 1.0, seed, step, off, backend=backend).cpu()
    z64 = fd.noise.normal(seed, torch.arange(off, off + M), step, d, dtype=F64)
    if backend in ("cpu", "torch") or dtype == F32 and backend == "cuda_emu":
        # double Box–Muller like the reference: float32 bit for bit, float64 to the libm's last ulp
        want = z64.to(dtype)
        assert torch.equal(zk, want) if dtype == F32 else torch.allclose(zk, want, rtol=4e-16, atol=4e-16)
    else:
        ulps = (zk.double() - z64).abs() / (torch.finfo(dtype).eps * z64.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= NOISE_ULPS, float(ulps.max())
    x = torch.randn(M, d, generator=gen(9), dtype=dtype)
    D = torch.randn(M, d, generator=gen(10), dtype=dtype)
    out = ops.affine_step(x.to(dev), D.to(dev), 0.9, 0.2, 1.3, seed, step, off, backend=backend)
    ref = 0.9 * x.double() + 0.2 * D.double() + 1.3 * z64
    assert bool(((out.cpu().double() - ref).abs() <= step_tol(ref, dtype)).all())
    xi = x.clone().to(dev)
    ops.affine_step(xi, D.to(dev), 0.9, 0.2, 1.3, seed, step, off, out=xi, backend=backend)
    assert torch.equal(xi, out)
    ode = ops.affine_step(x.to(dev), D.to(dev), 0.5, 0.5, 0.0, seed, step, off, backend=backend).cpu()
    assert torch.allclose(ode, (0.5 * x.double() + 0.5 * D.double()).to(dtype), atol=4 * torch.finfo(dtype).eps)
