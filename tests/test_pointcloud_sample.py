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


# ---------------------------------------------------------------- the multistep columns B1, B2 (issue 14, item 4)
from contract import F32, backends, fa_close  # noqa: E402
from fastdiff import _table  # noqa: E402
from fastdiff.reference import affine_step as ref_affine  # noqa: E402
from fastdiff.reference import pointcloud_sample as ref_sample  # noqa: E402
from fastdiff.reference import posterior as ref_posterior  # noqa: E402

# float64 kernels against the float64 reference on multistep tables: relative to the states' scale. The kernels
# and the reference differ only by rounding (the same terms in the same order), ~1e-15 per step.
MULTISTEP_REL64 = 1e-12
MULTISTEP_BACKENDS = ("cpu", "cuda", "cuda_emu")


def multistep_table(K, seed, depth=2):
    """A random [K, 8] kernel table using B1 from row 1 and B2 from row 2 (depth 2), or B1 only (depth 1): the
    coefficients of a contracting multistep method's size (A ~ 1, B0 ~ 0.3, |B1|, |B2| <= 0.3, C ~ 0.2)."""
    g = gen(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(K, generator=g, dtype=F64)   # noqa: E731
    B1 = torch.cat([torch.zeros(1, dtype=F64), u(-0.3, 0.3)[1:]])
    B2 = torch.cat([torch.zeros(2, dtype=F64), u(-0.3, 0.3)[2:]]) if depth == 2 else None
    return _table.pack(u(0.5, 1.0), u(0.2, 1.5), u(0.7, 1.0), u(0.0, 0.4), u(0.0, 0.3), t=u(0, 1), B1=B1, B2=B2)


def _reference_step(traj, k, table, data, seed, off, lw, v, dtype):
    """State k + 1 from the kernel's own states k, k − 1, k − 2 by the reference's operations in `dtype`: the
    one-step update at row k, then B1 D(state k − 1, row k − 1) and B2 D(state k − 2, row k − 2)."""
    rows = table.tolist()
    data, lw = data.to(dtype), None if lw is None else lw.to(dtype)

    def D(j):
        return ref_posterior(traj[j].to(dtype), data, rows[j][_table.ALPHA], rows[j][_table.SIGMA], lw, v)[0]

    r = rows[k]
    out = ref_affine(traj[k].to(dtype), D(k), r[_table.A], r[_table.B0], r[_table.C], seed, k, off)
    for j, col in ((1, _table.B1), (2, _table.B2)):
        if r[col] != 0.0:
            out.add_(D(k - j), alpha=r[col])
    return out


def check_multistep_trajectory(traj, x0, data, table, seed, off, lw=None, v=0.0):
    """Each state against the reference step from the kernel's own earlier states (fa_close in float32, 1e-12
    relative in float64), so the check measures the kernel rather than the grid's amplification of rounding."""
    traj = traj.detach().cpu()
    assert torch.equal(traj[0], x0.detach().cpu())
    for k in range(table.shape[0]):
        r64 = _reference_step(traj, k, table, data, seed, off, lw, v, F64)
        if traj.dtype == F32:
            fa_close(traj[k + 1], r64, _reference_step(traj, k, table, data, seed, off, lw, v, F32), f"step {k}")
        else:
            err = float((traj[k + 1] - r64).abs().max())
            assert err <= MULTISTEP_REL64 * (float(r64.abs().max()) + 1), f"step {k}: error {err:.3g}"


@pytest.mark.parametrize("backend, dtype", backend_dtypes(*MULTISTEP_BACKENDS))
@pytest.mark.parametrize("M, N, d, K, depth", [
    (1, 1, 2, 3, 2), (37, 19, 2, 6, 2), (129, 23, 3, 5, 1), (9, 40, 64, 6, 2), (5, 17, 65, 6, 2),
    (6, 11, 300, 5, 2), (7, 13, 65, 4, 1),
], ids=["1x1-d2", "37x19-d2", "129x23-d3-B1", "9x40-d64", "5x17-d65", "6x11-d300", "7x13-d65-B1"])
def test_multistep_columns_follow_the_reference(backend, dtype, M, N, d, K, depth):
    """Random B1/B2 tables on odd shapes, both small-d (registers) and large-d (scratch) paths, with log-weights,
    bandwidth and a sample offset: every state against the reference step (history from the kernel's own
    states), and the whole float64 run within 1e-12 relative of fastdiff.reference.pointcloud_sample."""
    g = gen(100 + d + M)
    y = torch.randn(N, d, generator=g, dtype=F64)
    x = torch.randn(M, d, generator=g, dtype=F64).to(dtype)
    lw = torch.log(torch.rand(N, generator=g, dtype=F64) + 0.1)
    table = multistep_table(K, d + K, depth)
    assert _table.uses_history(table)
    dev = device(backend)
    xk = x.clone().to(dev)
    traj = ops.pointcloud_sample(xk, y.to(dtype).to(dev), table, 11, 5, lw.to(dev), 0.02, True, backend=backend)
    assert torch.equal(traj[-1], xk)
    check_multistep_trajectory(traj, x, y.to(dtype), table, 11, 5, lw, 0.02)
    if dtype == F64:
        xr = x.clone()
        whole = ref_sample(xr, y, table, 11, 5, lw, 0.02, True)
        err = float((traj.cpu() - whole).abs().max())
        assert err <= MULTISTEP_REL64 * (float(whole.abs().max()) + 1), f"whole run: error {err:.3g}"


@pytest.mark.parametrize("backend, dtype", backend_dtypes(*MULTISTEP_BACKENDS))
@pytest.mark.parametrize("d", [3, 65])
def test_one_step_tables_keep_their_bits(backend, dtype, d):
    """A one-step table (B1 = B2 = 0) runs the kernels as before the multistep columns: the whole trajectory is,
    bit for bit, pointcloud_step applied row by row on the same backend; and the first row of a multistep table,
    which has no history terms, gives that row's one-step bits."""
    g = gen(200 + d)
    y = torch.randn(21, d, generator=g, dtype=F64).to(dtype)
    x = torch.randn(10, d, generator=g, dtype=F64).to(dtype)
    dev = device(backend)
    table = multistep_table(5, d, 2)
    one_step = table.clone()
    one_step[:, _table.B1] = 0.0
    one_step[:, _table.B2] = 0.0
    xs = x.clone().to(dev)
    traj = ops.pointcloud_sample(xs, y.to(dev), one_step, 9, 2, None, 0.0, True, backend=backend)
    xk = x.clone().to(dev)
    for k, r in enumerate(one_step.tolist()):
        ops.pointcloud_step(xk, y.to(dev), r[_table.ALPHA], r[_table.SIGMA], r[_table.A], r[_table.B0], r[_table.C],
                            9, k, 2, out=xk, backend=backend)
        assert torch.equal(traj[k + 1], xk), f"step {k}"
    # row 0 of a multistep table is a one-step row (no history yet); from row 1 on the history terms count
    multi = ops.pointcloud_sample(x.clone().to(dev), y.to(dev), table, 9, 2, None, 0.0, True, backend=backend)
    assert torch.equal(multi[1], traj[1])
    assert not torch.equal(multi[2], traj[2])


@pytest.mark.parametrize("backend", backends("torch", *MULTISTEP_BACKENDS))
@pytest.mark.parametrize("row, col", [(0, _table.B1), (0, _table.B2), (1, _table.B2)])
def test_history_from_before_the_first_row_is_refused(backend, row, col):
    """There is no D_{-1} or D_{-2}: a table whose row 0 uses B1, or rows 0 or 1 use B2, is a ValueError naming
    the row on every backend (fastdiff.ops checks the table once), and x is untouched."""
    dev = device(backend)
    x = torch.randn(4, 3, generator=gen(7)).to(dev)
    table = multistep_table(3, 7)
    table[row, col] = 0.125
    xc = x.clone()
    with pytest.raises(ValueError, match=f"table row {row} uses a D from before the first step"):
        ops.pointcloud_sample(xc, torch.randn(5, 3, generator=gen(8)).to(dev), table, 0, backend=backend)
    assert torch.equal(xc, x)

