"""The CPU posterior's AMX screen (csrc/cpu/posterior_amx.h): bf16 tile dot products, a bound on their error, then
the AVX-512 screen's anchor, pruning rule and exact stage.

The other posterior tests run the cpu backend with AMX on wherever this machine has it. These pin what is AMX's
own: bits equal to the screen's without AMX (both sum exactly the survivors within T of the best logit), the bf16
slack where the rounding errors all point one way, the rows and points that must bypass it; and, with AMX off,
the int8 engine that AVX-512 CPUs without AMX run (its bound sharp where every quantisation residual points one
way, its scales at their edges) and the main screening checks, which AMX hides on such a machine.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import fastdiff as fd
from contract import F64, check_posterior, gen, math7
from fastdiff import _C, ops
from fastdiff.reference import pointcloud_step as ref_step
from fastdiff.reference import posterior as ref_posterior

F32 = torch.float32
AMX = _C.cpu_amx()
needs_amx = pytest.mark.skipif(not AMX["available"], reason=f"no AMX here: {AMX['reason']}")
needs_int8_screen = pytest.mark.skipif(not AMX["int8_screen"], reason="this build has no int8 screen (AVX-512 VNNI)")


@contextmanager
def amx(on: bool):
    before = _C.cpu_amx()["enabled"]
    _C.set_cpu_amx(on)
    try:
        yield
    finally:
        _C.set_cpu_amx(before)


def with_and_without_amx(fn):
    with amx(True):
        a = fn()
    with amx(False):
        b = fn()
    return a, b


def assert_same_bits(a, b, what):
    for u, v, name in zip(a, b, ("D", "L"), strict=True):
        assert torch.equal(u, v), f"{what}: {name} differs, max |Δ| = {float((u - v).abs().max()):.3g}"


def clustered_problem(d, M, N, sigma, alpha, seed):
    """N float32 points in clusters of 8 (members ~3σ apart: several share the weight at σ) and M queries
    x = α·y_i + σ·z, M and N deliberately not multiples of the 16-row and 64-point blocks."""
    g = gen(seed)
    centres = torch.randn(N // 8 + 1, 1, d, generator=g, dtype=F64)
    step = torch.randn(N // 8 + 1, 8, d, generator=g, dtype=F64)
    y = (centres + 3 * sigma * step / step.norm(dim=2, keepdim=True)).reshape(-1, d)[:N]
    idx = torch.randint(N, (M,), generator=g)
    x = alpha * y[idx] + sigma * torch.randn(M, d, generator=g, dtype=F64)
    return x.float(), y.float()


def few_points_share_the_weight(x, y, alpha, sigma, most=24):
    """Each row keeps at most `most` points within 30 nats of its best: the screen decides (no row is dense)."""
    logits = -torch.cdist(x.double(), alpha * y.double()).square() / (2 * sigma**2)
    gaps = logits.max(1, keepdim=True).values - logits
    return int((gaps < 30).sum(1).max()) <= most


@needs_amx
@pytest.mark.parametrize("d", [33, 64, 100, 784])
@pytest.mark.parametrize("sigma, alpha", [(0.5, 0.9), (1e-3, 1 / math.sqrt(1 + 1e-6)), (0.05, 0.3)])
def test_amx_screen_equals_the_screen_without_amx_bit_for_bit(d, sigma, alpha):
    """37 rows, 1003 points, clustered: every row screened by AMX and, with AMX off, by the int8 engine (few
    points share the weight: checked), D and L identical; and within the float32 contract of the float64
    reference."""
    x, y = clustered_problem(d, 37, 1003, sigma, alpha, seed=d)
    assert few_points_share_the_weight(x, y, alpha, sigma)
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, backend="cpu"))
    assert_same_bits(on, off, f"d={d} σ={sigma}")
    check_posterior(*on, x, y, alpha, sigma)


@needs_amx
@pytest.mark.parametrize("d", [31, 32, 257, 600])
@pytest.mark.parametrize("sigma", [0.5, 1e-3])
def test_amx_screen_boundaries_against_the_reference(d, sigma):
    """d = 31 (AMX and the narrow exact stage) and 32 (AMX and finish_row), 257 (a second screen level of one dimension)
    and 600 (levels 256, 512, 600): against the float64 reference, and each row alone equals its row in the
    batch."""
    alpha = 0.9
    x, y = clustered_problem(d, 37, 1003, sigma, alpha, seed=100 + d)
    with amx(True):
        D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
        check_posterior(D, L, x, y, alpha, sigma)
        for r in (0, 17, 36):
            Dr, Lr = ops.posterior(x[r:r + 1], y, alpha, sigma, backend="cpu")
            assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), r


@pytest.mark.parametrize("d, engine", [(16, "amx"), (40, "amx"), (16, "int8"), (40, "int8")])
@pytest.mark.parametrize("N", [65536, 65537])
def test_survivor_lists_of_16_and_32_bit_indices(d, engine, N):
    """Each row's survivors are gathered from the screen's keep masks as 16-bit indices up to 2¹⁶ points (the
    sweep's padded count) and as 32-bit ones beyond (posterior_amx.h, gather_survivors16/32): read in place by
    the narrow exact stage (d = 16) or widened for finish_row (d = 40). Rows at the last clusters (index N − 1:
    the top of the 16-bit range at N = 2¹⁶, past it at 2¹⁶ + 1), the first and the middle, at σ = 0.5, where
    each keeps from one point to thousands within T = ln N + 16 nats but fewer than N / 8 at d = 40
    and N / 3 at d = 16 (screened, neither crowded nor spread; at σ = 0.05 bf16's slack would pass a d = 16
    window and the rows go to the blocked kernel): against the float64 reference, and each row alone equals
    its row of the batch. engine: AMX's bf16 dots, or the int8 engine's (AMX off)."""
    if not (AMX["available"] if engine == "amx" else AMX["int8_screen"]):
        pytest.skip(f"no {engine} screen here")
    sigma, alpha = 0.5, 0.9
    _, y = clustered_problem(d, 1, N, sigma, alpha, seed=N + d)
    pick = torch.tensor([N - 1, N - 3, N - 9, 65535, 0, 5, N // 2, 40001, 65528, 12345, 65533])
    g = gen(N + 1)
    x = (alpha * y.double()[pick] + sigma * torch.randn(len(pick), d, generator=g, dtype=F64)).float()
    logits = -torch.cdist(x.double(), alpha * y.double()).square() / (2 * sigma**2)
    kept = ((logits.max(1, keepdim=True).values - logits) < math.log(N) + 16).sum(1)
    assert int(kept.max()) < N // (3 if d < 32 else 8), kept.tolist()
    with amx(engine == "amx"):
        D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
        check_posterior(D, L, x, y, alpha, sigma)
        for r in (0, 3, 10):
            Dr, Lr = ops.posterior(x[r:r + 1], y, alpha, sigma, backend="cpu")
            assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), r


@needs_amx
@pytest.mark.parametrize("d", [32, 64, 300])
def test_dense_rows_leave_the_screen_either_way(d):
    """σ = √d: about half the points share the weight, every row is dense for both screens (at every AMX level)
    and goes to the same dense kernel (the dot form, or the blocked kernel where it refuses), so the bits agree."""
    sigma = math.sqrt(d)
    x, y = clustered_problem(d, 21, 515, 0.5, 0.9, seed=7)
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, 0.9, sigma, backend="cpu"))
    assert_same_bits(on, off, f"dense d={d}")
    check_posterior(*on, x, y, 0.9, sigma)


def coherent_rounding_problem(d=64, N=256, sigma=0.1, seed=3):
    """One query x on the bf16 grid of [1, 2) (spacing 2⁻⁷), the winner y = x, and N − 1 points whose every
    coordinate lies just below a midpoint of that grid: each rounds down by ~2⁻⁸, so every product of their bf16
    dots with x errs the same way and the dot falls short by ~0.37 (α = 1), ~37 nats of logit at σ = 0.1, more
    than T = ln N + 16 = 21.5. About 20 of them lie 0.5 to 24 nats below the winner, the rest ≥ 200 nats away. A
    screen whose slack ignored bf16 (float's ~2⁻¹⁷ relative) would keep the winner (its dot is exact) and prune
    all of those; the bound (2⁻⁷·|x|·|y| ≈ 1.1) keeps them."""
    g = gen(seed)
    grid = 2.0**-7
    below_midpoint = lambda k: 1.0 + (k + 0.5) * grid - 2.0**-20      # noqa: E731
    base = torch.randint(40, 80, (d,), generator=g)
    x = 1.0 + base.double() * grid
    inv2c = 1 / (2 * sigma**2)
    points = [x.clone()]
    while len(points) < 24:   # shifts of whole grid steps keep every coordinate below a midpoint
        y = below_midpoint((base + torch.randint(-3, 3, (d,), generator=g)).double())
        gap = float(((x - y) ** 2).sum()) * inv2c
        if 0.5 < gap < 24:
            points.append(y)
    while len(points) < N:   # 30..40 steps each way: ≥ 200 nats away, still in [1, 2)
        sign = torch.randint(0, 2, (d,), generator=g) * 2 - 1
        y = below_midpoint((base + sign * torch.randint(30, 41, (d,), generator=g)).double())
        assert float(((x - y) ** 2).sum()) * inv2c > 200
        points.append(y)
    y = torch.stack(points)[torch.randperm(N, generator=g)]
    assert torch.equal(y.float().double(), y) and torch.equal(x.float().double(), x)   # exact in float32
    return x[None].float(), y.float(), 1.0, sigma


@needs_amx
def test_bf16_slack_where_every_rounding_points_the_same_way():
    x, y, alpha, sigma = coherent_rounding_problem()
    bf16_dot = (x.bfloat16().double() * y.bfloat16().double()).sum(1)
    shortfall = (x.double() * y.double()).sum(1) - bf16_dot
    winner = (y == x).all(1)
    assert float(shortfall[winner].abs().max()) == 0.0
    assert float(shortfall[~winner].min()) * 2 / (2 * sigma**2) > 30   # > T: every other point looks prunable
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, backend="cpu"))
    assert_same_bits(on, off, "coherent bf16 rounding")
    check_posterior(*on, x, y, alpha, sigma)
    # sharp: the points 0.5..24 nats below the winner move L by far more than its tolerance
    _, L64 = ref_posterior(x.double(), y.double(), alpha, sigma)
    _, L_winner = ref_posterior(x.double(), x.double(), alpha, sigma)
    assert float(L64[0] - L_winner[0]) > 1e-2


@needs_amx
def test_points_and_rows_beyond_the_float_range_of_the_bound():
    """d = 64, σ = 20 keeps these float32 calls in float32 (the ops layer's float64 rule): a point with |y| = 8e18
    gets NaN norms (never pruned, rescored exactly), a row with |αx| = 7e18 goes to the blocked kernel. Both paths
    agree with the reference; the point is far, so the other points carry the weight."""
    d, sigma, alpha = 64, 20.0, 0.9
    x, y = clustered_problem(d, 19, 300, 0.5, alpha, seed=11)
    y[5] = 1e18
    x[3] = 1e18
    reach = float(x.abs().max()) + alpha * float(y.abs().max())
    assert reach**2 * d / (2 * sigma**2) < 1e36            # the ops layer keeps the call in float32
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, backend="cpu"))
    for D, L in (on, off):
        assert torch.isfinite(D).all() and torch.isfinite(L).all()
    D64, L64 = ref_posterior(x.double(), y.double(), alpha, sigma)
    ymax = float(y.abs().max())
    for D, L in (on, off):
        assert float((D.double() - D64).abs().max()) <= 1e-4 * ymax
        assert float(((L.double() - L64).abs() - 1e-6 * L64.abs()).max()) <= 1e-3


@needs_amx
def test_points_whose_squared_norm_overflows_float_are_kept():
    """α = 1e-18, σ = 1 (the ops layer's float64 rule does not fire: α·max|y| = 19): three points at |y| ≈ 1.9e19,
    whose |y|² overflows float32, hold most of the weight of the rows next to them; three at |y| ≈ 1.7e19 (|y|²
    still finite) lie ~2 nats below, and 200 points near the origin are > 150 nats away. The large ones must reach
    the exact stage (their float norms are NaN, which no test prunes). Dropped, L would fall by > 0.5."""
    d, sigma, alpha = 32, 1.0, 1e-18
    g = gen(12)
    e = torch.randn(d, generator=g, dtype=F64)
    e = e / e.norm()
    jitter = lambda n: 1e17 * torch.randn(n, d, generator=g, dtype=F64)     # noqa: E731  (α·1e17 = 0.1)
    y = torch.cat([1.9e19 * e + jitter(3), 1.7e19 * e + jitter(3), 1e18 * torch.randn(200, d, generator=g, dtype=F64)])
    x = alpha * y[:3].repeat(3, 1) + 0.3 * torch.randn(9, d, generator=g, dtype=F64)
    x, y = x.float(), y.float()
    assert not torch.isfinite((y.double()[:3] ** 2).sum(1).float()).any()
    with amx(True):
        D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
    D64, L64 = ref_posterior(x.double(), y.double(), alpha, sigma)
    assert float((D.double() - D64).abs().max()) <= 1e-4 * float(y.abs().max())
    assert float(((L.double() - L64).abs() - 1e-6 * L64.abs()).max()) <= 1e-3
    _, L_rest = ref_posterior(x.double(), y.double()[3:], alpha, sigma)
    assert float((L64 - L_rest).min()) > 0.5                   # sharp: the three carry the weight


def weak_first_dims(d, weak, M, N, sigma, alpha, seed, eps=0.04, offset=0.02):
    """Clustered points whose first `weak` coordinates are offset + eps·(their value), like data alike in its first
    dimensions (the near-blank top rows of MNIST digits), and queries x = α·y_i + σ·z. At σ = 0.05 and eps = 0.04
    those coordinates still point each query's screen at its own cluster (the anchor), but their partial
    distances are below the anchor's whole one: no row decides before the screen level that reaches past `weak`.
    The offset gives the first level's dots a share of the bound (2α·x·y over 256 coordinates ≈ 0.2, against a
    margin of ~0.8 for the best point): a screen that dropped them at the next level prunes ~3 of a cluster's 8."""
    g = gen(seed)
    centres = torch.randn(N // 8 + 1, 1, d, generator=g, dtype=F64)
    step = torch.randn(N // 8 + 1, 8, d, generator=g, dtype=F64)
    y = (centres + 3 * sigma * step / step.norm(dim=2, keepdim=True)).reshape(-1, d)[:N]
    y[:, :weak] = offset + eps * y[:, :weak]
    a = torch.as_tensor(alpha, dtype=F64).reshape(-1, 1)
    x = a * y[torch.randint(N, (M,), generator=g)] + sigma * torch.randn(M, d, generator=g, dtype=F64)
    return x.float(), y.float()


@needs_amx
@pytest.mark.parametrize("d, weak, levels", [(784, 300, 2), (1100, 600, 3)])
def test_rows_decided_at_later_screen_levels(d, weak, levels):
    """Rows decided at level 1 (d = 784: 256 → 512 dimensions) and level 2 (d = 1100: 256 → 512 → 1024): the dots
    accumulated across levels, the cloud's per-level norms and the queries' partial |x|², with per-row α (both
    sides of ½) and σ in one 16-row block, with and without a bandwidth: against the reference, and each row alone
    (scalar α, σ) equals its row of the batch. With AMX off the int8 engine screens the same levels: the
    reference's accuracy on every row, and at d = 784 AMX's bits on the α = 0.9 rows."""
    M, N, sigma0 = 21, 700, 0.05
    g = gen(d + 1)
    alpha = torch.where(torch.arange(M) % 2 == 0, 0.9, 0.3).double()
    sigma = sigma0 * (1 + 0.2 * torch.rand(M, generator=g, dtype=F64))
    x, y = weak_first_dims(d, weak, M, N, sigma0, alpha, seed=d)
    for v in (0.0, 1e-4):
        on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, bandwidth=v, backend="cpu"))  # noqa
        check_posterior(*on, x, y, alpha, sigma, v=v)
        check_posterior(*off, x, y, alpha, sigma, v=v)
        if levels == 2:   # the α = 0.9 rows; at α = 0.3 the weak coordinates' signal is 9x smaller and a row
            # can end dense for one screen and not the other (their slacks differ)
            even = slice(0, None, 2)
            assert_same_bits((on[0][even], on[1][even]), (off[0][even], off[1][even]), f"d={d} v={v}")
        for r in (0, 5, 20):
            with amx(True):
                alone = ops.posterior(x[r:r + 1], y, float(alpha[r]), float(sigma[r]), bandwidth=v, backend="cpu")
            assert torch.equal(alone[0], on[0][r:r + 1]) and torch.equal(alone[1], on[1][r:r + 1]), r


@needs_amx
@pytest.mark.parametrize("offset", [30.0, 100.0])
def test_rows_too_coarse_for_bf16_go_to_the_avx512_screen(offset):
    """Clusters about offset·𝟙 at σ = 0.05: |x|·|y| ≈ offset²·d, so the bf16 slack (2⁻⁶ of it) is wider than any
    row's pruning window and the AMX screen keeps every point. Those rows go to the AVX-512 screen (float slack),
    not to the blocked kernel: the same bits as with AMX off, every row of a 37-row call (rows mapped through
    the hand-over), and the reference's accuracy."""
    d, sigma, alpha = 130, 0.05, 0.9
    x, y = clustered_problem(d, 37, 1003, sigma, alpha, seed=31)
    x, y = x + alpha * offset, y + offset
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, backend="cpu"))
    assert_same_bits(on, off, f"offset {offset}")
    check_posterior(*on, x, y, alpha, sigma)


@needs_amx
def test_many_threads_pack_the_cloud_lazily_together():
    """4 OpenMP threads over 4999 points (79 sweep groups packed on first use by whichever thread needs them),
    two screen levels: the bits of 1 thread and of the screen without AMX (the int8 engine)."""
    x, y = weak_first_dims(600, 280, 70, 4999, 0.05, 0.9, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        many = with_and_without_amx(lambda: ops.posterior(x, y, 0.9, 0.05, backend="cpu"))
        torch.set_num_threads(1)
        one = with_and_without_amx(lambda: ops.posterior(x, y, 0.9, 0.05, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert_same_bits(many[0], many[1], "4 threads, AMX against int8")
    assert_same_bits(many[0], one[0], "AMX, 4 threads against 1")
    check_posterior(*many[0], x, y, 0.9, 0.05)


@needs_amx
@pytest.mark.parametrize("d", [40, 300])
def test_pointcloud_step_and_sample_equal_bits_with_and_without_amx(d):
    """The fused step and the whole trajectory read the posterior through the same screen. The step (σ = 0.05,
    every row screened): equal bits on and off, and against the float64 reference. A trajectory from pure noise
    passes through σ where a row can be dense for one screen and not for the other (their crowding tests differ),
    and the blocked kernel's sums are not the exact stage's: there the two agree to float rounding."""
    alpha, sigma = 0.9, 0.05
    x, y = clustered_problem(d, 21, 777, sigma, alpha, seed=5)
    step = lambda: (ops.pointcloud_step(x, y, alpha, sigma, 0.7, 0.3, 0.1, seed=9, step=2, backend="cpu"),  # noqa
                    torch.zeros(()))
    on, off = with_and_without_amx(step)
    assert_same_bits(on, off, f"pointcloud_step d={d}")
    ref = ref_step(x.double(), y.double(), alpha, sigma, 0.7, 0.3, 0.1, seed=9, step=2)
    for out, _ in (on, off):   # B·(MATH.md §7's D bound) plus the float32 rounding of the update
        assert float((out.double() - ref).abs().max()) <= 0.3 * 1e-4 * float(y.abs().max()) + 1e-6
    process = fd.processes.VP()
    sample = lambda: (fd.sample(fd.denoisers.PointCloud(y, process, backend="cpu"), process, n=x.shape[0],  # noqa
                                steps=6, method="dpmpp_2m", seed=4, backend="cpu"), torch.zeros(()))
    s_on, s_off = with_and_without_amx(sample)
    assert torch.isfinite(s_on[0]).all()
    assert float((s_on[0] - s_off[0]).abs().max()) <= 1e-5 * float(y.abs().max())


@needs_amx
@pytest.mark.parametrize("d", [64, 784])
@pytest.mark.parametrize("kind", ["random", "clusters"])
def test_sigma_1e_3_with_amx_off(d, kind):
    """The screening checks at σ = 1e-3 with AMX off, which AMX hides on this machine: the int8 engine on an
    AVX-512 build with VNNI, the AVX-512 screen on others."""
    from test_posterior import _check_sigma_1e_3
    with amx(False):
        _check_sigma_1e_3("cpu", F32, d, kind)


@needs_amx
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_screening_boundary_and_cancellation_with_amx_off(offset):
    """The pruning boundary and a first-chunk decoy (d = 130) with AMX off, and under a common offset of 100 the
    cancellation, where the int8 engine finds the rows coarse and hands them to the AVX-512 screen."""
    from test_posterior import (
        test_screening_cancellation_under_a_large_common_offset,
        test_screening_pruning_boundary_and_a_first_chunk_decoy,
    )
    with amx(False):
        test_screening_pruning_boundary_and_a_first_chunk_decoy("cpu", F32, 130, offset)
        if offset:
            test_screening_cancellation_under_a_large_common_offset("cpu", F32, 130)


def assert_close_to_the_blocked_kernel(on, off, y, what):
    """Below d = 32 AMX rows are rescored sixteen survivors at a time (posterior_narrow.h) and the blocked kernel
    sums every point: the two agree to float rounding, not bit for bit."""
    scale = float(y.abs().max())
    assert float((on[0] - off[0]).abs().max()) <= 2e-6 * scale, f"{what}: D"
    assert bool(((on[1] - off[1]).abs() <= 4e-6 * (1 + off[1].abs())).all()), f"{what}: L"


@needs_amx
@pytest.mark.parametrize("d", [16, 17, 24, 31])
@pytest.mark.parametrize("sigma", [0.8, 0.5, 0.05, 1e-3])
def test_narrow_rows_against_the_reference_and_the_blocked_kernel(d, sigma):
    """16 ≤ d < 32: the AMX screen then the narrow exact stage (one or two vectors a point, d = 16 its own
    instantiation). 37 rows, 1003 clustered points (at σ = 0.8 some rows keep more than N/2 and go to the
    blocked kernel after the screen): MATH.md §7 against float64, float rounding of the blocked kernel (AMX off),
    and each row alone equals its row in the batch."""
    alpha = 0.9
    x, y = clustered_problem(d, 37, 1003, sigma, alpha, seed=200 + d)
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, backend="cpu"))
    D0, L0 = ref_posterior(x.double(), y.double(), torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64),
                           None, 0.0)
    math7(*on, D0, L0, y)
    assert_close_to_the_blocked_kernel(on, off, y, f"d={d} σ={sigma}")
    with amx(True):
        for r in (0, 20, 36):
            Dr, Lr = ops.posterior(x[r:r + 1], y, alpha, sigma, backend="cpu")
            assert torch.equal(Dr, on[0][r:r + 1]) and torch.equal(Lr, on[1][r:r + 1]), r


@needs_amx
def test_narrow_rows_with_a_spread_posterior_per_row_sigma_and_a_bandwidth():
    """d = 20, 300 random points, per-row σ from 0.2 to 6 and a bandwidth: rows whose window reaches the mean
    squared distance, or 3/4 of the 64 probe points, are sent to the blocked kernel before any dot product, crowded
    ones after the screen (the test on every 8th point, then more than N/2 survivors), the rest rescored; every row
    as the blocked kernel computes it to float rounding, §7 against float64, and rows alone as in the batch."""
    d, M, N = 20, 41, 300
    g = gen(12)
    y = torch.randn(N, d, generator=g, dtype=F64)
    x = 0.8 * y[torch.randint(N, (M,), generator=g)] + 0.5 * torch.randn(M, d, generator=g, dtype=F64)
    x, y = x.float(), y.float()
    alpha = torch.full((M,), 0.8, dtype=F64)
    sigma = torch.logspace(math.log10(0.2), math.log10(6.0), M, dtype=F64)
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, alpha, sigma, bandwidth=0.01, backend="cpu"))
    D0, L0 = ref_posterior(x.double(), y.double(), alpha, sigma, None, 0.01)
    math7(*on, D0, L0, y)
    assert_close_to_the_blocked_kernel(on, off, y, "spread rows")
    with amx(True):
        for r in (0, 13, 27, 40):
            Dr, Lr = ops.posterior(x[r:r + 1], y, alpha[r:r + 1], sigma[r:r + 1], bandwidth=0.01, backend="cpu")
            assert torch.equal(Dr, on[0][r:r + 1]) and torch.equal(Lr, on[1][r:r + 1]), r


@needs_amx
def test_narrow_rows_crowded_by_a_blob_behind_far_outliers():
    """d = 16: 900 points in a tight blob and 100 outliers ~400 away. The outliers inflate the mean squared distance,
    so neither the window test nor the probe flags the 30 queries in the blob, yet each keeps ~90% of the points:
    the test on every 8th point sends them to the blocked kernel (equal bits), while the 7 queries among the
    outliers are screened and rescored (float rounding of it); §7 for all."""
    g = gen(3)
    d = 16
    blob = 0.3 * torch.randn(900, d, generator=g, dtype=F64)
    far = 100.0 * torch.randn(100, d, generator=g, dtype=F64)
    y = torch.cat([blob[:450], far, blob[450:]]).float()
    x = torch.cat([0.9 * blob[torch.randint(900, (30,), generator=g)], 0.9 * far[:7]])
    x = (x + torch.randn(37, d, generator=g, dtype=F64)).float()
    on, off = with_and_without_amx(lambda: ops.posterior(x, y, 0.9, 1.0, backend="cpu"))
    assert torch.equal(on[0][:30], off[0][:30]) and torch.equal(on[1][:30], off[1][:30])
    assert_close_to_the_blocked_kernel(on, off, y, "outlier rows")
    D0, L0 = ref_posterior(x.double(), y.double(), torch.tensor(0.9, dtype=F64), torch.tensor(1.0, dtype=F64), None,
                           0.0)
    math7(*on, D0, L0, y)


@needs_amx
def test_narrow_row_far_from_every_point_and_a_bf16_anchor_off_by_nats():
    """d = 16. A query 100 away from every point takes the far rule (the same posterior_row_far as the blocked
    kernel: equal bits). And a query x on the bf16 grid with two candidates: A = x (exact in bf16) and B, every
    coordinate 8.5 grid steps away, just above a midpoint, so its bf16 dot with x is overestimated by ~0.19 while
    it is truly 0.07 farther (3.5 nats at σ = 0.1): the anchor is B, A's weight would exceed 1 against it and
    the exact stage redoes its sums against A's logit. D and L against float64 either way."""
    d, sigma = 16, 0.1
    g = gen(5)
    grid = 2.0**-7
    x = 1.0 + torch.randint(40, 80, (d,), generator=g).double() * grid
    B = x + 8.5 * grid + 2.0**-20
    assert float(2 * (x * B.to(torch.bfloat16).double()).sum() - (B * B).sum()) > float((x * x).sum())  # B looks best
    far = 3.0 + torch.randn(61, d, generator=g, dtype=F64)                 # many nats from x: pruned
    y = torch.cat([far[:30], x[None], far[30:], B[None]]).float()
    queries = torch.stack([x, x + 100.0]).float()
    on, off = with_and_without_amx(lambda: ops.posterior(queries, y, 1.0, sigma, backend="cpu"))
    assert torch.equal(on[0][1], off[0][1]) and torch.equal(on[1][1], off[1][1])
    D0, L0 = ref_posterior(queries.double(), y.double(), torch.tensor(1.0, dtype=F64), torch.tensor(sigma, dtype=F64),
                           None, 0.0)
    math7(*on, D0, L0, y)
    assert_close_to_the_blocked_kernel(on, off, y, "bf16 anchor")


@needs_int8_screen
@pytest.mark.parametrize("d", [16, 17, 24, 31, 32, 64, 127, 257, 600])
@pytest.mark.parametrize("sigma", [0.8, 0.5, 0.05, 1e-3])
def test_int8_screen_rows(d, sigma):
    """From d = 16 where AMX is not in use (AMX off here; an AVX-512 CPU without AMX always): the same screen with
    8-bit integer dot products and their own bound (posterior_amx.h, int8_sweep), then the narrow exact stage below
    d = 32 and finish_row from 32; d = 257 and 600 screen in levels (256 dimensions, then 4 or 256 + 88: each
    level its own scales). 37 rows, 1003 clustered points, M and N off the 16-row and 64-point blocks: MATH.md §7
    against float64, AMX's rows to float rounding where this CPU has AMX, and each row alone equals its row in the
    batch."""
    alpha = 0.9
    x, y = clustered_problem(d, 37, 1003, sigma, alpha, seed=300 + d)
    with amx(False):
        D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
        for r in (0, 20, 36):
            Dr, Lr = ops.posterior(x[r:r + 1], y, alpha, sigma, backend="cpu")
            assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), r
    D0, L0 = ref_posterior(x.double(), y.double(), torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64),
                           None, 0.0)
    math7(D, L, D0, L0, y)
    if AMX["available"]:
        with amx(True):
            on = ops.posterior(x, y, alpha, sigma, backend="cpu")
        assert_close_to_the_blocked_kernel(on, (D, L), y, f"int8 screen d={d} σ={sigma}")


@needs_int8_screen
def test_int8_screen_per_row_alpha_sigma_and_a_bandwidth():
    """d = 20: per-row α on both sides of ½ (the exact stage's two splits of x − αy) and 0 (every point at the
    same distance; the query's scale then 1 and its bytes 0), per-row σ, with and without a bandwidth, in one call:
    the reference's own float32 error (check_posterior), and each row alone equals its row in the batch."""
    d, M, N = 20, 19, 517
    x, y = clustered_problem(d, M, N, 0.3, 0.9, seed=41)
    alpha = torch.linspace(0.0, 1.0, M, dtype=F64)
    sigma = torch.linspace(0.2, 0.6, M, dtype=F64)
    for v in (0.0, 0.001):
        with amx(False):
            D, L = ops.posterior(x, y, alpha, sigma, bandwidth=v, backend="cpu")
            for r in (0, 9, 18):
                Dr, Lr = ops.posterior(x[r:r + 1], y, alpha[r:r + 1], sigma[r:r + 1], bandwidth=v, backend="cpu")
                assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), (v, r)
        check_posterior(D, L, x, y, alpha, sigma, v=v)


def coherent_quantisation_problem(d=64, N=256, sigma=0.1, seed=4):
    """The int8 engine's counterpart of coherent_rounding_problem. One query x on the grid k/32 (k from 40 to 80,
    and 127/32 in coordinate 0, so its scale is 1/32 and its bytes exact), the winner y = x, and N − 1 points with
    the same coordinate 0 (the same scale) whose other coordinates lie just below a midpoint of the grid: each
    rounds down by ~1/64, every term of x·(y − s·q) is positive, and the 8-bit dot falls short by ~1.8 (α = 1),
    ~180 nats of logit at σ = 0.1. About 20 points lie 0.5 to 24 nats below the winner, the rest ≥ 200 nats away.
    A screen that took the 8-bit dot for the dot would keep the winner and prune all of those; the bound
    (|x|·|y − s·q| per point, int8_sweep) keeps them."""
    g = gen(seed)
    grid = 1.0 / 32
    below_midpoint = lambda k: (k + 0.5) * grid - 2.0**-15      # noqa: E731
    base = torch.randint(40, 80, (d,), generator=g)
    base[0] = 127
    x = base.double() * grid
    inv2c = 1 / (2 * sigma**2)
    points = [x.clone()]

    def point(shift):
        y = below_midpoint((base + shift).double())
        y[0] = x[0]
        return y
    while len(points) < 24:
        y = point(torch.randint(-2, 2, (d,), generator=g))
        gap = float(((x - y) ** 2).sum()) * inv2c
        if 0.5 < gap < 24:
            points.append(y)
    while len(points) < N:
        sign = torch.randint(0, 2, (d,), generator=g) * 2 - 1
        y = point(sign * torch.randint(30, 38, (d,), generator=g))
        assert float(((x - y) ** 2).sum()) * inv2c > 200
        points.append(y)
    y = torch.stack(points)[torch.randperm(N, generator=g)]
    assert torch.equal(y.float().double(), y) and torch.equal(x.float().double(), x)   # exact in float32
    return x[None].float(), y.float(), 1.0, sigma


def coherent_query_problem(d=64, m=48, N=256, sigma=0.02, seed=5):
    """The query's side of the same bound: y on the grid k/32 (127/32 in coordinate 0: scale 1/32, bytes exact), and
    x with m coordinates at 1/64 − 2⁻¹⁵, just below the grid's midpoint between 0 and 1/32: each rounds down to 0,
    so the query's residual f is +1/64 there. The winner has 0 in those coordinates, an equally near point 1/32:
    its 8-bit dot falls short by f·y = m/2048 (58 nats at σ = 0.02) and the winner's does not. About 20 points
    1 to 10 grid steps from the winner elsewhere (1.2 to 12 nats) carry 1/32 in all m, the rest are ≥ 200 nats
    away. A bound without |f|·|y| prunes those 20; the real one keeps them."""
    g = gen(seed)
    grid = 1.0 / 32
    base = torch.randint(40, 80, (d,), generator=g)
    base[0] = 127
    base[1:m + 1] = 0
    x = base.double() * grid
    x[1:m + 1] = grid / 2 - 2.0**-15
    winner = base.double() * grid
    inv2c = 1 / (2 * sigma**2)
    points = [winner]
    while len(points) < 24:
        shift = torch.zeros(d, dtype=torch.long)
        shift[m + 1:] = torch.randint(-1, 2, (d - m - 1,), generator=g) * (torch.rand(d - m - 1, generator=g) < 0.3)
        y = (base + shift).double() * grid
        y[1:m + 1] = grid
        gap = float(((x - y) ** 2).sum() - ((x - winner) ** 2).sum()) * inv2c
        if 1 < gap < 13:
            points.append(y)
    while len(points) < N:
        sign = torch.randint(0, 2, (d,), generator=g) * 2 - 1
        y = (base + sign * torch.randint(30, 38, (d,), generator=g)).double() * grid
        y[0] = winner[0]
        assert float(((x - y) ** 2).sum() - ((x - winner) ** 2).sum()) * inv2c > 200
        points.append(y)
    y = torch.stack(points)[torch.randperm(N, generator=g)]
    assert torch.equal(y.float().double(), y) and torch.equal(x.float().double(), x)   # exact in float32
    return x[None].float(), y.float(), 1.0, sigma


@needs_int8_screen
@pytest.mark.parametrize("side", ["points", "query"])
def test_int8_slack_where_every_residual_points_the_same_way(side):
    """The points' residuals (coherent_quantisation_problem) or the query's (coherent_query_problem) all push
    the 8-bit dots one way: the bound keeps what a screen trusting those dots would prune."""
    x, y, alpha, sigma = coherent_quantisation_problem() if side == "points" else coherent_query_problem()
    scale = y.abs().amax(1, keepdim=True).double() / 127
    t = float(x.abs().max()) / 127
    dot8 = ((x.double() / t).round() * t * (y.double() / scale).round() * scale).sum(1)
    shortfall = (x.double() * y.double()).sum(1) - dot8
    logit = -((x.double() - y.double()) ** 2).sum(1) / (2 * sigma**2)
    best = int(logit.argmax())
    near = (logit[best] - logit < 24) & (torch.arange(len(y)) != best)
    assert float(shortfall[best].abs()) == 0.0 and int(near.sum()) >= 20
    # trusting dot8, every near point would look more than T = ln N + 16 below the winner
    assert float((logit[best] - logit - 2 * shortfall / (2 * sigma**2))[near].abs().min()) > math.log(len(y)) + 16
    with amx(False):
        D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
    check_posterior(D, L, x, y, alpha, sigma)
    if AMX["available"]:
        with amx(True):
            on = ops.posterior(x, y, alpha, sigma, backend="cpu")
        assert_same_bits(on, (D, L), f"coherent quantisation of the {side}")
    # sharp: the near points move L by far more than its tolerance
    _, L64 = ref_posterior(x.double(), y.double(), alpha, sigma)
    _, L_best = ref_posterior(x.double(), y.double()[best:best + 1], alpha, sigma)
    assert float(L64[0] - L_best[0]) > 1e-2


@needs_int8_screen
def test_int8_screen_scales_far_apart():
    """d = 40, the int8 engine's per-point and per-query scales at their edges: points with one coordinate 10³
    times the rest (their other bytes round to 0: the residual is nearly the whole point), a zero point (scale 1),
    points of size 1e-39 (denormal scales and residuals), and queries next to each of these, a zero query and one
    at α = 0. Against the reference's own error, and each row alone equals its row in the batch."""
    d, sigma, alpha = 40, 0.05, 0.9
    x, y = clustered_problem(d, 30, 400, sigma, alpha, seed=51)
    y = y.double()
    y[:16, 7] *= 1e3                       # peaky points, far from the rest
    y[16] = 0.0
    y[17:25] *= 1e-39 / float(y[17:25].abs().max())
    x = x.double()
    for r, j in enumerate((0, 5, 16, 17, 20)):
        x[r] = alpha * y[j] + sigma * torch.randn(d, generator=gen(r), dtype=F64)
    x[5] = 0.0
    x, y = x.float(), y.float()
    a = torch.full((30,), alpha, dtype=F64)
    a[6] = 0.0
    with amx(False):
        D, L = ops.posterior(x, y, a, sigma, backend="cpu")
        for r in (0, 2, 3, 5, 6):
            Dr, Lr = ops.posterior(x[r:r + 1], y, a[r:r + 1], sigma, backend="cpu")
            assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), r
    check_posterior(D, L, x, y, a, sigma)


def test_the_switch_and_the_reason():
    """cpu_amx() says whether AMX is available (and why not), set_cpu_amx turns it off and on,
    FASTDIFF_CPU_AMX=0 starts a process with it off, and `fastdiff info` says which screen runs."""
    state = _C.cpu_amx()
    assert set(state) == {"available", "reason", "enabled", "int8_screen"}
    assert state["available"] == (state["reason"] == "")
    with amx(False):
        assert _C.cpu_amx()["enabled"] is False
    assert _C.cpu_amx()["enabled"] == state["enabled"]
    code = "from fastdiff import _C; print(_C.cpu_amx()['enabled'])"
    env = dict(os.environ, FASTDIFF_CPU_AMX="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    info = subprocess.run([sys.executable, "-m", "fastdiff", "info"], env=env, capture_output=True, text=True,
                          check=True).stdout
    screen = [line for line in info.splitlines() if line.startswith("cpu posterior screen:")]
    assert screen and (("turned off" in screen[0]) if state["available"] else (state["reason"] in screen[0]))
    # the vector ISA the kernels were built for, which the benchmarks name the CPU by (fastdiff._backend.cpu_isa)
    cfg = _C.build_config()
    simd, native = cfg["cpu_simd"], "-march=native" in cfg["cxx_flags"]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if native and " avx512f" in flags:
        assert simd == "AVX-512"
    elif native and " avx2" in flags:
        assert simd == "AVX2"
    assert simd in screen[0] or state["enabled"]
    # the reason names the CPU when the CPU is what lacks AMX, whatever the build's -march
    if flags and platform.machine() == "x86_64" and " amx_bf16" not in flags:
        assert state["reason"] == "this CPU has no AMX-BF16"
    # the int8 engine from d = 16 wherever AMX is not in use: built with AVX-512, VBMI2 and VNNI
    if native:
        assert state["int8_screen"] == (simd == "AVX-512" and " avx512_vbmi2" in flags and " avx512_vnni" in flags)
    assert ("8-bit dot products" in screen[0]) == state["int8_screen"]
    from fastdiff import _backend
    assert _backend.cpu_isa() == ("AMX" if state["available"] and state["enabled"] else
                                  "AVX-512 VNNI" if state["int8_screen"] else simd)
