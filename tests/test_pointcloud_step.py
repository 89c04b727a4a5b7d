"""pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out): the
fused posterior + affine step on every backend this machine runs (tests/contract.py), through fastdiff.ops,
against the reference step from the same x (float32 relative to the float32 reference's own error; float64 to
1e-11). Select one backend with -k, e.g. `-k cuda_emu`."""
import pytest
import torch

import fastdiff as fd
from contract import F64, backend_dtypes, backends, check_step, cloud, device, gen
from fastdiff import ops
from fastdiff.reference import posterior as ref_posterior


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, N, d", [(7, 3, 2), (130, 70, 5), (9, 33, 65)])
def test_pointcloud_step_in_place_weights_and_bandwidth(backend, dtype, M, N, d):
    g = gen(M * N * d)
    y = torch.randn(N, d, generator=g, dtype=F64).to(dtype)
    x = torch.randn(M, d, generator=g, dtype=F64).to(dtype)
    lw = torch.log_softmax(torch.randn(N, generator=g, dtype=F64), 0)
    args = (0.8, 0.6, 0.97, 0.4, 0.3, 5, 12, 2**32 - 3)
    dev = device(backend)
    out = ops.pointcloud_step(x.to(dev), y.to(dev), *args, lw.to(dev), 0.1, backend=backend)
    check_step(out, x, y, *args, lw, 0.1)
    xi = x.clone().to(dev)                              # out = x: the same pointer as input and output
    ops.pointcloud_step(xi, y.to(dev), *args, lw.to(dev), 0.1, out=xi, backend=backend)
    assert torch.equal(xi, out)


@pytest.mark.parametrize("backend", backends())
def test_pointcloud_step_is_posterior_then_affine_step(backend):
    dev = device(backend)
    y = cloud(90, 3, 11, duplicates=True).float()
    x = torch.randn(65, 3, generator=gen(12))
    fused = ops.pointcloud_step(x.to(dev), y.to(dev), 0.7, 0.2, 1.1, 0.4, 0.3, 9, 4, 100, backend=backend).cpu()
    D0, _ = ref_posterior(x.double(), y.double(), 0.7, 0.2)
    z = fd.noise.normal(9, torch.arange(100, 165), 4, 3, dtype=F64)
    ref = 1.1 * x.double() + 0.4 * D0 + 0.3 * z
    assert torch.allclose(fused.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends("torch", "cpu"))
def test_pointcloud_step_takes_one_time_step(backend):
    """alpha and sigma are numbers (one step): a per-row [M] value is refused, naming it, with x untouched."""
    x = torch.randn(3, 2, generator=gen(1))
    keep = x.clone()
    for name, kw in (("alpha", dict(alpha=torch.full((3,), 0.8, dtype=F64), sigma=0.5)),
                     ("sigma", dict(alpha=0.8, sigma=torch.full((3,), 0.5, dtype=F64)))):
        with pytest.raises(ValueError, match=rf"^{name} must be a number"):
            ops.pointcloud_step(x, x[:2], A=0.9, B=0.1, C=0.3, seed=1, step=2, out=x, backend=backend, **kw)
        assert torch.equal(x, keep)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [130, 784])
def test_pointcloud_step_near_duplicates_at_small_sigma_large_d(backend, dtype, d):
    """Issue 15: the fused step shares the posterior's large-d path (a screen at small σ). Clusters of 8 points 3σ
    apart at σ = 1e-3 (several points within a few nats of the best), x = α·y_i + σ·z, log-weights with −inf."""
    from test_posterior import clustered, noisy_queries, vp_alpha
    sigma = 1e-3
    alpha = vp_alpha(sigma)
    y = clustered(20, d, 3 * sigma, seed=d + 50)
    x = noisy_queries(y, 11, alpha, sigma, seed=d + 51)
    lw = torch.log_softmax(torch.randn(y.shape[0], generator=gen(d + 52), dtype=F64), 0)
    lw[5::9] = -float("inf")
    x, y = x.to(dtype), y.to(dtype)
    args = (alpha, sigma, 0.2, 0.8, 1e-3, 3, 7, 40)
    dev = device(backend)
    out = ops.pointcloud_step(x.to(dev), y.to(dev), *args, lw.to(dtype).to(dev), backend=backend)
    check_step(out, x, y, *args, lw.to(dtype))
