"""posterior(x, data, alpha, sigma, log_weights, bandwidth) -> (D [M, d], L [M]) on every backend this machine
runs (tests/contract.py: torch, cpu, triton, cuda, cuda_emu), through fastdiff.ops, against the torch reference
in float64 on the same inputs with the shared tolerances (float32 relative to the float32 reference's own error
plus MATH.md §7; float64 to 1e-11). Select one backend with -k, e.g. `-k cuda_emu`."""
import math

import pytest
import torch

from contract import F64, backend_dtypes, check_posterior, cloud, device, gen
from fastdiff import ops


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (129, 257, 3), (3, 300, 7), (5, 40, 129)])
@pytest.mark.parametrize("sigma", [1e-3, 0.5, 1e3])
def test_posterior_odd_shapes_near_duplicates_and_sigma_1e_3_to_1e3(backend, dtype, M, N, d, sigma):
    y = cloud(N, d, 1, duplicates=True).to(dtype)
    x = (y.double()[torch.arange(M) % N] + 0.3 * torch.randn(M, d, generator=gen(2), dtype=F64)).to(dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), 0.8, sigma * math.sqrt(d), backend=backend)
    check_posterior(D, L, x, y, 0.8, sigma * math.sqrt(d))
