"""pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory): every step of
a float64 [K, WIDTH] kernel table (fastdiff._table), x updated in place, on every backend this machine runs
(tests/contract.py), through fastdiff.ops; each state of the trajectory against the reference step from the
kernel's own previous state. Select one backend with -k, e.g. `-k cuda_emu`."""
import pytest
import torch

import fastdiff as fd
from contract import (
    CUDA,
    F32,
    F64,
    backend_dtypes,
    backends,
    check_trajectory,
    cloud,
    device,
    fa_close,
    gen,
    step_table,
)
from fastdiff import _table, ops
from fastdiff.reference import affine_step as ref_affine
from fastdiff.reference import pointcloud_sample as ref_sample
from fastdiff.reference import posterior as ref_posterior


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


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [3, 9])              # the CPU's one-query kernel (d <= 4) and the blocked one (d >= 5)
def test_pointcloud_sample_runs_the_table_row_by_row(backend, dtype, d):
    """Each state of the trajectory is the reference step of the table's row k (noise step k) from the kernel's
    previous state; x ends as the last state, updated in place."""
    M, N, K, seed, off = 37, 29, 4, 11, 2**33 + 5
    p = fd.DriftedVE(T=10.0, beta="t")
    table = step_table(p, K, "ei-x0")
    y = cloud(N, d, 21, duplicates=True).to(dtype)
    lw = torch.log(torch.rand(N, generator=gen(22), dtype=F64) + 0.1).to(dtype)
    x = p.prior(M, d, seed=23).to(dtype)
    dev = device(backend)
    xk = x.clone().to(dev)
    traj = ops.pointcloud_sample(xk, y.to(dev), table, seed, off, lw.to(dev), 0.01, True, backend=backend).cpu()
    assert traj.shape == (K + 1, M, d) and traj.dtype == dtype
    assert torch.equal(traj[-1], xk.cpu()) and not torch.equal(traj[-1], x)
    check_trajectory(traj, x, y, table, seed, off, lw, 0.01)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("d", [2, 6])
def test_pointcloud_step_is_a_one_row_table(backend, d):
    """pointcloud_step and pointcloud_sample share one kernel path: step 0 of a one-row table is bit for bit
    the step; a strided x is updated in place, and return_trajectory=False returns None."""
    dev = device(backend)
    y = cloud(40, d, 24).float().to(dev)
    x = torch.randn(50, d, generator=gen(25)).to(dev)
    row = _table.pack(0.8, 0.6, 1.05, 0.3, 0.4)
    stepped = ops.pointcloud_step(x, y, 0.8, 0.6, 1.05, 0.3, 0.4, 7, 0, 3, backend=backend)
    xs = x.clone()
    assert ops.pointcloud_sample(xs, y, row, 7, 3, backend=backend) is None
    assert torch.equal(xs, stepped)
    strided = torch.zeros(50, 2 * d, device=dev)[:, ::2]
    strided.copy_(x)
    ops.pointcloud_sample(strided, y, row, 7, 3, backend=backend)
    assert torch.equal(strided, stepped)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("process, method, ode, d", [
    (fd.VP(), "ei", False, 2),
    (fd.DriftedVE(T=10.0, beta="t"), "ei-x0", False, 3),
    (fd.PureVE(T=10.0), "euler", True, 7),
    (fd.OU(theta=0.5, g=1.0, T=10.0), "ei", False, 65),
], ids=["VP-2", "DriftedVE-3", "PureVE-ode-7", "OU-65"])
def test_pointcloud_sample_normalised_weights_step_by_step(backend, process, method, ode, d):
    """Normalised weights (a bandwidth for d = 3), K = 6, sample_offset 0, float32."""
    g = gen(d)
    N, M, K = 23, 9, 6
    data = torch.randn(N, d, generator=g)
    x = process.prior(M, d, seed=4)
    weights = torch.rand(N, generator=g, dtype=F64) + 0.1
    lw = torch.log(weights / weights.sum())
    v = 0.05 if d == 3 else 0.0
    table = step_table(process, K, method, ode)
    dev = device(backend)
    out = x.clone().to(dev)
    traj = ops.pointcloud_sample(out, data.to(dev), table, 4, 0, lw.to(dev), v, True, backend=backend)
    assert torch.equal(out, traj[-1])
    check_trajectory(traj, x, data, table, 4, 0, lw, v)


@pytest.mark.parametrize("backend", backends())
def test_pointcloud_sample_is_batch_invariant_and_trajectory_optional(backend):
    p = fd.VP()
    d, N, M = 2, 17, 45
    dev = device(backend)
    data = torch.randn(N, d, generator=gen(17)).to(dev)
    x = p.prior(M, d, seed=1).to(dev)
    table = step_table(p, 5, "ei", schedule="uniform")
    whole = x.clone()
    assert ops.pointcloud_sample(whole, data, table, 1, 0, backend=backend) is None      # in place, no trajectory
    assert not torch.equal(whole, x)
    a, b = x[:20].clone(), x[20:].clone()
    ops.pointcloud_sample(a, data, table, 1, 0, backend=backend)
    ops.pointcloud_sample(b, data, table, 1, 20, backend=backend)
    assert torch.equal(torch.cat([a, b]), whole)
    y = x.clone()
    traj = ops.pointcloud_sample(y, data, table, 1, 0, None, 0.0, True, backend=backend)
    assert traj.shape == (len(table) + 1, *x.shape) and torch.equal(traj[-1], whole) and torch.equal(y, whole)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("d", [2, 5])
def test_whole_trajectory_through_fd_sample_matches_the_reference(backend, d):
    """fd.sample on a PointCloud (ei-x0, 12 karras steps of PureVE) against the torch backend's whole run."""
    p = fd.PureVE(T=20.0)
    data = cloud(40, d, 13)
    cloud_ref = fd.PointCloud(data.float(), p, bandwidth=0.01)
    kw = dict(n=64, steps=12, schedule="karras", method="ei-x0", seed=3, return_trajectory=True)
    x_ref, traj_ref = fd.sample(cloud_ref, backend="torch", **kw)
    cloud_dev = fd.PointCloud(data.float().to(device(backend)), p, bandwidth=0.01)
    x_k, traj_k = fd.sample(cloud_dev, backend=backend, **kw)
    assert traj_k.shape == traj_ref.shape == (13, 64, d)
    for k in range(13):
        scale = float(traj_ref[k].abs().max())
        assert torch.allclose(traj_k[k].cpu(), traj_ref[k], rtol=1e-4, atol=1e-5 * scale), k


# Triton under the interpreter: half a minute for what test_pointcloud_sample_is_batch_invariant_... checks
@pytest.mark.parametrize("backend", backends(exclude=() if CUDA else ("triton",)))
def test_batch_invariance_through_fd_sample(backend):
    cloud_ = fd.PointCloud(cloud(50, 2, 14).float().to(device(backend)), fd.DriftedVE(T=30.0))
    kw = dict(steps=10, method="ei", seed=8, backend=backend)
    big = fd.sample(cloud_, n=300, **kw)
    assert torch.equal(big[:100], fd.sample(cloud_, n=100, **kw))
    assert torch.equal(big[120:200], fd.sample(cloud_, n=80, sample_offset=120, **kw))
    assert torch.equal(big, fd.sample(cloud_, n=300, chunk_size=29, **kw))

# ---------------------------------------------------------------- the multistep columns B1, B2 (issue 14, item 4)

# float64 kernels against the float64 reference on multistep tables: relative to the states' scale. The kernels
# and the reference differ only by rounding (the same terms in the same order), ~1e-15 per step.
MULTISTEP_REL64 = 1e-12
MULTISTEP_BACKENDS = ("cpu", "cuda", "cuda_emu", "triton")


def multistep_table(K, seed, depth=2):
    """A random [K, WIDTH] kernel table using B1 from row 1 and B2 from row 2 (depth 2), or B1 only (depth 1): the
    coefficients of a contracting multistep method's size (A ~ 1, B0 ~ 0.3, |B1|, |B2| <= 0.3, C ~ 0.2)."""
    g = gen(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(K, generator=g, dtype=F64)
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



# ------------------------------------------------ churned and two-stage rows (issue 14: both D's in one launch)
STAGE_BACKENDS = ("cpu", "cuda", "cuda_emu", "triton")


def stage_table(K, seed):
    """A random [K, WIDTH] table mixing one-step rows, churned rows (P ≠ 1, Cchurn > 0), two-stage rows (a stage
    point with its own α, σ and noise, D_u's weight BU, step noise correlated by rho) and the B1 and B2 history
    (from rows 1 and 2), with coefficients of a contracting sampler's size; the last row is a one-step row without
    history (pointcloud_step's bits after staged rows)."""
    g = gen(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(K, generator=g, dtype=F64)

    kind = torch.arange(K) % 3                      # 0: one-step, 1: churn + stage, 2: stage only
    kind[-1] = 0
    staged, churned = kind > 0, kind == 1
    zero = torch.zeros(K, dtype=F64)
    on = lambda mask, col: torch.where(mask, col, zero)        # noqa: E731
    B1 = torch.cat([torch.zeros(1, dtype=F64), u(-0.2, 0.2)[1:]])
    B2 = torch.cat([torch.zeros(2, dtype=F64), u(-0.1, 0.1)[2:]])[:K]
    B1[-1] = B2[-1] = 0.0
    return _table.pack(u(0.5, 1.0), u(0.2, 1.5), u(0.5, 0.9), u(0.0, 0.3), u(0.0, 0.3), t=u(0, 1), B1=B1, B2=B2,
                       P=torch.where(churned, u(0.9, 1.1), 1.0), Cchurn=on(churned, u(0.05, 0.3)),
                       alphaU=torch.where(staged, u(0.5, 1.0), 1.0), sigmaU=torch.where(staged, u(0.2, 1.5), 1.0),
                       Ux=on(staged, u(0.8, 1.0)), UD=on(staged, u(0.0, 0.3)), Uz=on(staged, u(0.0, 0.3)),
                       BU=on(staged, u(0.1, 0.3)), rho=on(staged, u(-0.8, 0.8)))


def _reference_stage_step(traj, k, table, data, seed, off, lw, v, dtype, columns=None):
    """State k + 1 from the kernel's own states by the reference's operations in `dtype`: row k as
    fastdiff.reference.pointcloud_sample runs it (churn, D, stage, D_u, correlated noise), then B1 times the D of
    row k − 1 at the kernel's state k − 1 (its churned x̂ for a churned row: the same draws), then B2 times row
    k − 2's D likewise. columns: a
    permutation of the d columns in which every posterior is evaluated (the same mathematics, other roundings of
    the distance sums)."""
    import importlib
    from unittest import mock
    module = importlib.import_module("fastdiff.reference.pointcloud_sample")
    rows = table.tolist()
    data, lw = data.to(dtype), None if lw is None else lw.to(dtype)
    posterior = ref_posterior
    if columns is not None:
        back = torch.argsort(columns)

        def posterior(x, y, *args):
            D, L = ref_posterior(x[:, columns], y[:, columns], *args)
            return D[:, back], L

    def step(j):                                    # (state after row j alone, D of row j)
        xj, r = traj[j].to(dtype).clone(), rows[j]
        if _table.row_is_one_step(r):
            D = posterior(xj, data, r[_table.ALPHA], r[_table.SIGMA], lw, v)[0]
            return ref_affine(xj, D, r[_table.A], r[_table.B0], r[_table.C], seed, j, off), D
        with mock.patch.object(module, "posterior", posterior):
            D = module._staged_row(xj, data, r, seed, j, off, lw, v)
        return xj, D
    out, _ = step(k)
    for j, col in ((1, _table.B1), (2, _table.B2)):
        if rows[k][col] != 0.0:
            out.add_(step(k - j)[1], alpha=rows[k][col])
    return out


def _reference32_stage_step(traj, k, table, data, seed, off, lw, v, r64, backend):
    """The float32 reference's state k + 1: for the Triton kernel, the one with the largest error against r64 of
    evaluations with the columns in their order and in 4 fixed shuffled orders. Why: one evaluation is one sample
    of how float32 rounds the distance sums, and on an ill-conditioned row (two points almost equally likely) it
    can be lucky. At d = 64, σ = 0.25 one row's D erred by 4.8e-7 in 7 of 12 column orders and by 1.9e-5 to
    3.8e-5 in the other 5; the Triton kernel, which sums in its own order (and forms its logits in float32 from
    log2(e)/(2c)), erred by 1.1e-5 there. All are float32 evaluations of the same problem. The cpu and cuda
    kernels, whose distance sums and logits follow the reference's arithmetic more closely, keep the single
    evaluation as their bar."""
    shuffles = 4 if backend == "triton" else 0
    d = traj.shape[-1]
    orders = [None] + [torch.randperm(d, generator=gen(1000 + i)) for i in range(shuffles)]
    cands = [_reference_stage_step(traj, k, table, data, seed, off, lw, v, F32, cols) for cols in orders]
    return max(cands, key=lambda r: float((r.double() - r64).abs().max()))


def _check_stage_trajectory(traj, table, y, seed, off, lw, v, backend):
    """Each state of a kernel's trajectory against the reference step from the kernel's own earlier states: fa_close
    against the float32 bar of _reference32_stage_step in float32, 1e-12 relative in float64."""
    for k in range(table.shape[0]):
        r64 = _reference_stage_step(traj, k, table, y, seed, off, lw, v, F64)
        if traj.dtype == F32:
            fa_close(traj[k + 1], r64, _reference32_stage_step(traj, k, table, y, seed, off, lw, v, r64, backend),
                     f"step {k}")
        else:
            err = float((traj[k + 1] - r64).abs().max())
            assert err <= MULTISTEP_REL64 * (float(r64.abs().max()) + 1), f"step {k}: error {err:.3g}"


@pytest.mark.parametrize("backend, dtype", backend_dtypes(*STAGE_BACKENDS))
@pytest.mark.parametrize("M, N, d, K", [(1, 1, 2, 4), (37, 19, 2, 7), (29, 23, 3, 6), (9, 40, 64, 6),
                                        (5, 17, 65, 6), (6, 11, 300, 4)],
                         ids=["1x1-d2", "37x19-d2", "29x23-d3", "9x40-d64", "5x17-d65", "6x11-d300"])
def test_churn_and_stage_rows_follow_the_reference(backend, dtype, M, N, d, K):
    """Random churn / stage / correlated-noise tables on odd shapes, the small-d (per row) and large-d (grouped)
    paths, with log-weights, bandwidth and a sample offset: every state against the reference step from the
    kernel's own states (fa_close in float32 against the worse of two float32 reference evaluations, 1e-12 relative
    in float64), and the whole float64 run within 1e-12 relative of fastdiff.reference.pointcloud_sample. The
    one-step rows of the table keep pointcloud_step's bits."""
    g = gen(300 + d + M)
    y = torch.randn(N, d, generator=g, dtype=F64)
    x = torch.randn(M, d, generator=g, dtype=F64).to(dtype)
    lw = torch.log(torch.rand(N, generator=g, dtype=F64) + 0.1)
    table = stage_table(K, d + K)
    assert _table.uses_stages(table)
    dev = device(backend)
    xk = x.clone().to(dev)
    traj = ops.pointcloud_sample(xk, y.to(dtype).to(dev), table, 11, 5, lw.to(dev), 0.02, True, backend=backend)
    assert torch.equal(traj[-1], xk)
    traj = traj.cpu()
    _check_stage_trajectory(traj, table, y, 11, 5, lw, 0.02, backend)
    row0 = table.tolist()[0]                        # a one-step row: pointcloud_step's bits
    first = ops.pointcloud_step(x.clone().to(dev), y.to(dtype).to(dev), row0[_table.ALPHA], row0[_table.SIGMA],
                                row0[_table.A], row0[_table.B0], row0[_table.C], 11, 0, 5, lw.to(dev), 0.02,
                                backend=backend)
    assert torch.equal(traj[1], first.cpu())
    rl = table.tolist()[-1]                         # the last one-step row, after staged rows: the same bits
    last = ops.pointcloud_step(traj[-2].clone().to(dev), y.to(dtype).to(dev), rl[_table.ALPHA], rl[_table.SIGMA],
                               rl[_table.A], rl[_table.B0], rl[_table.C], 11, K - 1, 5, lw.to(dev), 0.02,
                               backend=backend)
    assert torch.equal(traj[-1], last.cpu())
    if dtype == F64:
        whole = ref_sample(x.clone(), y, table, 11, 5, lw, 0.02, True)
        err = float((traj - whole).abs().max())
        assert err <= MULTISTEP_REL64 * (float(whole.abs().max()) + 1), f"whole run: error {err:.3g}"


@pytest.mark.parametrize("backend, dtype", backend_dtypes(*STAGE_BACKENDS))
@pytest.mark.parametrize("d", [3, 784])
def test_stage_rows_down_to_small_sigma_over_near_duplicates(backend, dtype, d):
    """Heun-like staged rows whose D and D_u are taken at σ = 0.1, 1e-2, 1e-3 and σ_U a third lower, over clusters
    of 8 points 3e-3 apart (the per-query path at d = 3, the screened one at d = 784), churn on the first row:
    each state against the reference step from the kernel's own previous one."""
    from test_posterior import clustered, noisy_queries, vp_alpha
    sigma = torch.tensor([0.1, 1e-2, 1e-3], dtype=F64)
    sigma_u = sigma / 3
    alpha, alpha_u = 1 / torch.sqrt(1 + sigma**2), 1 / torch.sqrt(1 + sigma_u**2)
    table = _table.pack(alpha, sigma, torch.full((3,), 0.1, dtype=F64), 0.4 * alpha, 0.2 * sigma,
                        P=torch.tensor([1.01, 1.0, 1.0], dtype=F64), Cchurn=torch.tensor([0.05, 0.0, 0.0], dtype=F64),
                        alphaU=alpha_u, sigmaU=sigma_u, Ux=alpha_u / alpha, UD=0.1 * alpha_u, Uz=0.5 * sigma_u,
                        BU=0.5 * alpha, rho=torch.tensor([0.3, -0.5, 0.0], dtype=F64))
    y = clustered(12, d, 3e-3, seed=70)
    x = noisy_queries(y, 7, vp_alpha(0.1), 0.1, seed=71).to(dtype)
    dev = device(backend)
    traj = ops.pointcloud_sample(x.clone().to(dev), y.to(dtype).to(dev), table, 5, 0, None, 0.0, True,
                                 backend=backend).cpu()
    _check_stage_trajectory(traj, table, y, 5, 0, None, 0.0, backend)


@pytest.mark.parametrize("backend", backends("torch", *STAGE_BACKENDS))
@pytest.mark.parametrize("d", [3, 65])
def test_stage_rows_are_row_invariant_and_draw_their_own_noise(backend, d):
    """Rows of a churned / two-stage run do not depend on the batch: a slice with its sample offset gives the same
    rows bit for bit; and each noise (churn, stage, step) matters: zeroing Cchurn, Uz or rho changes the run."""
    g = gen(400)
    dtype = F32 if backend == "triton" else F64     # (the Triton kernels compute in float32)
    y = torch.randn(13, d, generator=g, dtype=F64).to(dtype)
    x = torch.randn(20, d, generator=g, dtype=F64).to(dtype)
    table = stage_table(6, 41)
    dev = device(backend)
    whole = x.clone().to(dev)
    ops.pointcloud_sample(whole, y.to(dev), table, 3, 100, backend=backend)
    part = x[7:15].clone().to(dev)
    ops.pointcloud_sample(part, y.to(dev), table, 3, 107, backend=backend)
    assert torch.equal(part, whole[7:15])
    for col in (_table.CCHURN, _table.UZ, _table.RHO):
        t2 = table.clone()
        t2[:, col] = 0.0
        other = x.clone().to(dev)
        ops.pointcloud_sample(other, y.to(dev), t2, 3, 100, backend=backend)
        assert not torch.equal(other, whole), _table.COLUMNS[col]


@pytest.mark.parametrize("backend", backends("torch", *STAGE_BACKENDS))
def test_bad_stage_columns_are_named_and_x_untouched(backend):
    """A staged row (BU != 0) with sigmaU <= 0, or |rho| > 1, is a ValueError naming the column; x is unchanged."""
    dev = device(backend)
    x = torch.randn(4, 3, generator=gen(9)).to(dev)
    y = torch.randn(5, 3, generator=gen(10)).to(dev)
    for col, value, match in ((_table.SIGMA_U, 0.0, "sigmaU must be positive"),
                              (_table.RHO, 1.5, "rho is a correlation")):
        table = stage_table(3, 12)
        table[1, col] = value
        xc = x.clone()
        with pytest.raises(ValueError, match=match):
            ops.pointcloud_sample(xc, y, table, 0, backend=backend)
        assert torch.equal(xc, x)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_pointcloud_sample_down_to_small_sigma_over_near_duplicates_at_d_784(backend, dtype):
    """Issue 15: the sampler's large-d steps share the posterior's screen. Three steps σ = 0.1, 1e-2, 1e-3 over
    clusters of 8 points 3e-3 apart (the last steps weigh a few near-duplicates), each state against the
    reference step from the kernel's previous one."""
    from test_posterior import clustered, noisy_queries, vp_alpha
    d = 784
    sigma = torch.tensor([0.1, 1e-2, 1e-3], dtype=F64)
    alpha = 1 / torch.sqrt(1 + sigma**2)
    table = _table.pack(alpha, sigma, torch.full((3,), 0.1, dtype=F64), 0.9 * alpha, 0.3 * sigma)
    y = clustered(12, d, 3e-3, seed=60)
    x = noisy_queries(y, 7, vp_alpha(0.1), 0.1, seed=61).to(dtype)
    y = y.to(dtype)
    dev = device(backend)
    traj = ops.pointcloud_sample(x.clone().to(dev), y.to(dev), table, 5, 0, None, 0.0, True, backend=backend)
    check_trajectory(traj, x, y, table, 5, 0)
