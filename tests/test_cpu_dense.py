"""The CPU posterior's dense rows in the dot form (csrc/cpu/posterior_dense.h): float32, d >= 32, rows whose weight
is spread over much of the cloud (large σ) take their logits from dot products with a centred copy of the cloud,
where a per-pair test shows that as accurate as direct differences; the rows it refuses go direct.

Each case is held to the float32 reference's own error against float64 (check_posterior) on shapes that are not
multiples of the 4- and 8-row blocks or the tiles, and the refusal is pinned where the dot form would be wrong by
thousands of nats (near-duplicate points far from the cloud's centre).
"""
from __future__ import annotations

import math

import pytest
import torch

from contract import F64, check_posterior, check_step, gen
from fastdiff import ops

F32 = torch.float32


def spread_problem(d, M, N, sigma, alpha, seed, offset=0.0):
    """N standard normal points (plus a common offset) and M queries x = α·y_i + σ·z: at σ ≳ √d most points share
    the weight."""
    g = gen(seed)
    y = torch.randn(N, d, generator=g, dtype=F64) + offset
    idx = torch.randint(N, (M,), generator=g)
    x = alpha * y[idx] + sigma * torch.randn(M, d, generator=g, dtype=F64)
    return x.float(), y.float()


def effective_points(x, y, alpha, sigma):
    """1/Σw² per row (float64): how many points share each row's weight."""
    logits = -torch.cdist(x.double(), alpha * y.double()).square() / (2 * sigma**2)
    w = torch.softmax(logits, 1)
    return 1.0 / w.square().sum(1)


@pytest.mark.parametrize("d", [32, 33, 64, 100, 784, 3072])
@pytest.mark.parametrize("N", [7, 33, 515])
@pytest.mark.parametrize("alpha", [0.9, 0.3])
def test_dense_rows_against_the_reference(d, N, alpha):
    sigma = 2.0 * math.sqrt(d)
    x, y = spread_problem(d, 21, N, sigma, alpha, seed=d + N)
    assert float(effective_points(x, y, alpha, sigma).min()) > N / 8   # every row dense
    D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
    check_posterior(D, L, x, y, alpha, sigma)


@pytest.mark.parametrize("d", [64, 784])
def test_dense_rows_of_data_far_from_the_origin(d):
    """A common offset of 100 (|y| ≈ 100√d against a spread of √d): the centring carries the accuracy."""
    sigma = 3.0 * math.sqrt(d)
    x, y = spread_problem(d, 19, 300, sigma, 0.95, seed=3, offset=100.0)
    D, L = ops.posterior(x, y, 0.95, sigma, backend="cpu")
    check_posterior(D, L, x, y, 0.95, sigma)


def test_dense_rows_with_log_weights_and_a_bandwidth():
    d, N = 96, 401
    sigma = 2.0 * math.sqrt(d)
    x, y = spread_problem(d, 13, N, sigma, 0.8, seed=11)
    lw = torch.randn(N, generator=gen(12)).float()
    D, L = ops.posterior(x, y, 0.8, sigma, log_weights=lw, backend="cpu")
    check_posterior(D, L, x, y, 0.8, sigma, lw=lw)
    D, L = ops.posterior(x, y, 0.8, sigma, bandwidth=0.3, backend="cpu")
    check_posterior(D, L, x, y, 0.8, sigma, v=0.3)


def test_per_row_sigma_from_sparse_to_dense():
    """One call whose rows run from one point to all of them (σ from 0.01 to 40): screened, dot-form and refused
    rows side by side, each row's result the same alone as in the call."""
    d, M, N = 64, 37, 700
    sigmas = torch.logspace(-2, math.log10(40.0), M, dtype=F64)
    alphas = torch.linspace(0.2, 1.0, M, dtype=F64)
    g = gen(5)
    y = torch.randn(N, d, generator=g, dtype=F64)
    idx = torch.randint(N, (M,), generator=g)
    x = (alphas[:, None] * y[idx] + sigmas[:, None] * torch.randn(M, d, generator=g, dtype=F64)).float()
    y = y.float()
    D, L = ops.posterior(x, y, alphas, sigmas, backend="cpu")
    check_posterior(D, L, x, y, alphas, sigmas)
    for r in (0, 18, 36):
        Dr, Lr = ops.posterior(x[r:r + 1], y, alphas[r:r + 1], sigmas[r:r + 1], backend="cpu")
        assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), r


def test_rows_the_dot_form_must_refuse():
    """Two far clusters of near-duplicates (±50 along one axis, members 1e-4 apart) and queries on one cluster at
    σ = 1e-3: half the cloud shares the weight (dense rows), their distances are ~1e-7 while |a|·|b_j| ≈ 2500, so a
    dot product's rounding alone would move the logits by thousands of nats. The test sends every such row direct."""
    d, N, M = 40, 512, 11
    g = gen(8)
    y = 1e-4 * torch.randn(N, d, generator=g, dtype=F64)
    y[: N // 2, 0] += 50.0
    y[N // 2:, 0] -= 50.0
    sigma, alpha = 1e-3, 1.0
    idx = torch.randint(N // 2, (M,), generator=g)
    x = (alpha * y[idx] + sigma * torch.randn(M, d, generator=g, dtype=F64)).float()
    y = y.float()
    assert float(effective_points(x, y, alpha, sigma).min()) > N / 8
    D, L = ops.posterior(x, y, alpha, sigma, backend="cpu")
    check_posterior(D, L, x, y, alpha, sigma)


def test_results_do_not_depend_on_the_thread_count_or_the_block():
    """Tiles packed by whichever thread gets there first, 8-row and 4-row blocks: the same bits on 1 and 2 threads
    and for a row alone."""
    d = 784
    sigma = 2.0 * math.sqrt(d)
    x, y = spread_problem(d, 29, 333, sigma, 0.9, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.posterior(x, y, 0.9, sigma, backend="cpu")
        torch.set_num_threads(2)
        two = ops.posterior(x, y, 0.9, sigma, backend="cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    for r in (0, 7, 28):
        Dr, Lr = ops.posterior(x[r:r + 1], y, 0.9, sigma, backend="cpu")
        assert torch.equal(Dr, one[0][r:r + 1]) and torch.equal(Lr, one[1][r:r + 1]), r


def test_fused_step_through_dense_rows():
    d, N = 300, 257
    sigma, alpha = 2.0 * math.sqrt(d), 0.9
    x, y = spread_problem(d, 21, N, sigma, alpha, seed=4)
    out = ops.pointcloud_step(x, y, alpha, sigma, 0.7, 0.3, 0.1, seed=9, step=2, backend="cpu")
    check_step(out, x, y, alpha, sigma, 0.7, 0.3, 0.1, 9, 2, 0)
