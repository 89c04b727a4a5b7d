"""pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory): every step of
a float64 [K, 8] kernel table, x updated in place, on every backend this machine runs (tests/contract.py), through
fastdiff.ops; each state of the trajectory against the reference step from the kernel's own previous state.
Select one backend with -k, e.g. `-k cuda_emu`."""
import pytest
import torch

import fastdiff as fd
from contract import F64, backend_dtypes, check_trajectory, device, gen, step_table
from fastdiff import ops


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("process, method, ode, d", [
    (fd.VP(), "ei", False, 2),
    (fd.DriftedVE(T=10.0, beta="t"), "ei-x0", False, 3),
    (fd.PureVE(T=10.0), "euler", True, 7),
    (fd.OU(theta=0.5, g=1.0, T=10.0), "ei", False, 65),
], ids=["VP-2", "DriftedVE-3", "PureVE-ode-7", "OU-65"])
def test_pointcloud_sample_follows_the_reference_step_by_step(backend, dtype, process, method, ode, d):
    g = gen(d)
    N, M, K = 23, 9, 5
    y = torch.randn(N, d, generator=g, dtype=F64).to(dtype)
    x = process.prior(M, d, seed=4).to(dtype).contiguous()
    lw = torch.log(torch.rand(N, generator=g, dtype=F64) + 0.1)
    dev = device(backend)
    table = step_table(process, K, method, ode)
    xk = x.clone().to(dev)
    traj = ops.pointcloud_sample(xk, y.to(dev), table, 3, 7, lw.to(dev), 0.01, True, backend=backend)
    assert torch.equal(traj[-1], xk)
    check_trajectory(traj, x, y, table, 3, 7, lw, 0.01)
