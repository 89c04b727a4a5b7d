"""pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out): the
fused posterior + affine step on every backend this machine runs (tests/contract.py), through fastdiff.ops,
against the reference step from the same x (float32 relative to the float32 reference's own error; float64 to
1e-11). Select one backend with -k, e.g. `-k cuda_emu`."""
import pytest
import torch

from contract import F64, backend_dtypes, check_step, device, gen
from fastdiff import ops


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
