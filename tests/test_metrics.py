import itertools
import math

import pytest
import torch

from fastdiff import metrics as M

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def normal_pdf(mu=0.0, s=1.0):
    return lambda x: torch.exp(-0.5 * ((x[:, 0] - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))


# ----------------------------------------------------------------------------------------- gaussian_kl
def test_gaussian_kl_1d_closed_form():
    m0, s0, m1, s1 = 0.3, 0.7, -0.4, 1.6
    ref = math.log(s1 / s0) + (s0 ** 2 + (m0 - m1) ** 2) / (2 * s1 ** 2) - 0.5
    assert M.gaussian_kl([m0], [[s0 ** 2]], [m1], [[s1 ** 2]]) == pytest.approx(ref, rel=1e-12)
    assert M.gaussian_kl(m0, s0 ** 2, m1, s1 ** 2) == pytest.approx(ref, rel=1e-12)   # scalars: variances


def test_gaussian_kl_3d_monte_carlo_zero_asymmetry():
    g = gen(0)
    A, B = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(3, 3, generator=g, dtype=F64)
    S0, S1 = A @ A.T + 0.5 * torch.eye(3, dtype=F64), B @ B.T + 0.5 * torch.eye(3, dtype=F64)
    m0, m1 = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    kl = M.gaussian_kl(m0, S0, m1, S1)
    P = torch.distributions.MultivariateNormal(m0, S0)
    Q = torch.distributions.MultivariateNormal(m1, S1)
    torch.manual_seed(0)
    x = P.sample((200000,))
    lr = P.log_prob(x) - Q.log_prob(x)                     # KL = E_P log p/q
    assert abs(kl - float(lr.mean())) < 5 * float(lr.std()) / math.sqrt(len(lr))
    assert abs(kl - float(torch.distributions.kl_divergence(P, Q))) < 1e-10
    assert M.gaussian_kl(m0, S0, m0, S0) < 1e-12
    assert abs(M.gaussian_kl(m1, S1, m0, S0) - kl) > 0.1   # KL is not symmetric
    assert M.gaussian_kl(m0.numpy(), S0.numpy(), m1.numpy(), S1.numpy()) == pytest.approx(kl, rel=1e-12)


def test_gaussian_kl_singular_and_errors():
    line = torch.ones(2, 2, dtype=F64)                     # rank one: N0 singular -> KL = inf
    assert M.gaussian_kl(torch.zeros(2), line, torch.zeros(2), torch.eye(2)) == math.inf
    with pytest.raises(ValueError, match="cov1 must be positive definite"):
        M.gaussian_kl(torch.zeros(2), torch.eye(2), torch.zeros(2), line)
    with pytest.raises(ValueError, match="cov0"):
        M.gaussian_kl(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="mean1 contains NaN"):
        M.gaussian_kl(torch.zeros(2), torch.eye(2), torch.tensor([0.0, math.nan]), torch.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        M.gaussian_kl(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.zeros(2), torch.eye(2))


# ----------------------------------------------------------------------------------------- kl_histogram
def test_kl_histogram_1d_density():
    # bins of width 0.1 on [-6, 6.5]: discretisation changes a smooth KL by O(h²) ~ 1e-4; the MC bias is
    # ~ (occupied bins - 1)/(2n) ~ 2e-4 and the MC std of the shifted estimate ~ sqrt(Var log(p/q)/n)
    # = 0.5/sqrt(2e5) ~ 1.1e-3; so 1e-3 (same law) and 6e-3 (shifted) are > 5 standard errors.
    n, rng = 200000, (-6.0, 6.5)
    x = torch.randn(n, generator=gen(1), dtype=F64)
    assert 0 <= M.kl_histogram(x, density=normal_pdf(), bins=125, range=rng) < 1e-3
    kl = M.kl_histogram(x + 0.5, density=normal_pdf(), bins=125, range=rng)
    assert kl == pytest.approx(0.125, abs=6e-3)           # KL(N(0.5,1) || N(0,1)) = 0.5²/2
    # default range (padded sample range) gives a similar answer
    assert M.kl_histogram(x + 0.5, density=normal_pdf(), bins=125) == pytest.approx(0.125, abs=6e-3)


def test_kl_histogram_reference_mode_and_outside_mass():
    x = torch.randn(100000, generator=gen(2), dtype=F64)
    ref = torch.randn(1000000, generator=gen(3), dtype=F64)
    assert M.kl_histogram(x, reference=ref, bins=100) < 2e-3
    assert M.kl_histogram(x + 0.5, reference=ref, bins=100, range=(-6, 6.5)) == pytest.approx(0.125, abs=8e-3)
    # half the samples outside the grid: p̂ sums to 1/2, not renormalised -> (1/2) log(1/2) + (1/2) KL(...)
    y = torch.cat([x, x + 100])
    kl = M.kl_histogram(y, reference=ref, bins=100, range=(-6, 6))
    assert kl == pytest.approx(0.5 * math.log(0.5), abs=2e-3)


def test_kl_histogram_2d():
    # p = N(0, I₂) on a 60x60 grid over [-6, 6]²; samples from N((0.6, -0.3), I₂): KL = |μ|²/2 = 0.225

    def dens(z):
        return torch.exp(-0.5 * (z ** 2).sum(1)) / (2 * math.pi)
    n, rng = 400000, ((-6, 6), (-6, 6))
    z = torch.randn(n, 2, generator=gen(4), dtype=F64)
    assert M.kl_histogram(z, density=dens, bins=60, range=rng) < 3e-3
    kl = M.kl_histogram(z + torch.tensor([0.6, -0.3], dtype=F64), density=dens, bins=60, range=rng)
    assert kl == pytest.approx(0.225, abs=0.01)
    ref = torch.randn(n, 2, generator=gen(5), dtype=F64)
    assert M.kl_histogram(z, reference=ref, bins=(40, 30)) < 5e-3


def test_kl_histogram_errors():
    x = torch.randn(100, generator=gen(0))
    with pytest.raises(ValueError, match="exactly one"):
        M.kl_histogram(x)
    with pytest.raises(ValueError, match="exactly one"):
        M.kl_histogram(x, density=normal_pdf(), reference=x)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        M.kl_histogram(torch.randn(10, 3), reference=torch.randn(10, 3))
    with pytest.raises(ValueError, match="range"):
        M.kl_histogram(x, reference=x, range=(1, -1))
    with pytest.raises(ValueError, match="samples contains NaN"):
        M.kl_histogram(torch.tensor([0.0, math.nan]), reference=x)
    with pytest.raises(ValueError, match="bins"):
        M.kl_histogram(x, reference=x, bins=0)


# ----------------------------------------------------------------------------------------- W2
def test_w2_translate_and_bruteforce():
    x = torch.randn(300, 3, generator=gen(6), dtype=F64)
    v = torch.tensor([0.3, -1.2, 0.5], dtype=F64)
    assert M.w2(x, x + v) == pytest.approx(float(v.norm()), rel=1e-9)    # translate: W2 = |v|
    assert M.w2(x, x[torch.randperm(300, generator=gen(0))]) < 1e-12
    # 6 points in 2-D: the optimum over all 720 matchings
    a, b = torch.randn(6, 2, generator=gen(7), dtype=F64), torch.randn(6, 2, generator=gen(8), dtype=F64)
    best = min(float(((a - b[list(p)]) ** 2).sum(1).mean()) for p in itertools.permutations(range(6)))
    assert M.w2(a, b) == pytest.approx(math.sqrt(best), rel=1e-9)


def test_w2_1d():
    x, y = torch.randn(500, generator=gen(9), dtype=F64), 2 * torch.rand(500, generator=gen(10), dtype=F64)
    ref = math.sqrt(float(((x.sort().values - y.sort().values) ** 2).mean()))   # monotone matching
    assert M.w2(x, y) == pytest.approx(ref, rel=1e-12)
    # unequal sizes: {0, 1} vs {0, 0.5, 1}; optimal plan moves 1/6 of mass by 0.5 twice: W2² = 1/12
    assert M.w2([0.0, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)


def test_w2_gaussians_and_subsampling():
    x = torch.randn(4000, generator=gen(11), dtype=F64)
    y = 1 + torch.randn(4000, generator=gen(12), dtype=F64)
    assert M.w2(x, y) == pytest.approx(1.0, abs=0.08)                  # W2(N(0,1), N(1,1)) = 1
    assert M.w2(x, y, seed=1) != M.w2(x, y, seed=2)                    # subsampled to max_n=2000
    assert M.w2(x, y, seed=1) == M.w2(x, y, seed=1)
    x2, y2 = torch.randn(400, 2, generator=gen(13), dtype=F64), torch.randn(400, 2, generator=gen(14), dtype=F64)
    assert M.w2(x2, y2 + torch.tensor([1.0, 0.0], dtype=F64)) == pytest.approx(1.0, abs=0.12)


def test_w2_needs_pot_for_unequal_sizes():
    try:
        import ot  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pot"):
            M.w2(torch.randn(5, 2), torch.randn(6, 2))
    else:
        assert M.w2(torch.zeros(5, 2), torch.ones(6, 2)) == pytest.approx(math.sqrt(2), rel=1e-9)
    with pytest.raises(ValueError, match="same dimension"):
        M.w2(torch.randn(5, 2), torch.randn(5, 3))


def test_w2_binned():
    pytest.importorskip("ot")
    h = 7 / 64                                             # bin width on [-3.5, 3.5]
    g = gen(15)
    idx = torch.randint(10, 50, (3000, 2), generator=g).to(F64)
    x = -3.5 + (idx + 0.5) * h + (torch.rand(3000, 2, generator=g, dtype=F64) - 0.5) * h / 2
    shift = torch.tensor([3 * h, -2 * h], dtype=F64)       # whole bins: the binned law is translated
    assert M.w2_binned(x, x + shift) == pytest.approx(math.sqrt(13) * h, rel=1e-9)
    assert M.w2_binned(x, x) < 1e-12


# ----------------------------------------------------------------------------------------- sliced W2
def test_sliced_w2():
    x = torch.randn(500, 2, generator=gen(16), dtype=F64)
    assert M.sliced_w2(x, x) == 0.0
    # y = x + v: every projection is a translate, so W2²(θᵀx, θᵀy) = (θᵀv)² exactly, and for θ uniform
    # on S^{d-1}, E (θᵀv)² = |v|²/d: SW2 -> |v|/sqrt(d). With L = 4000 directions in d = 2, (θᵀv)²/|v|²
    # = cos²φ has variance 1/8, so SW2² has relative std sqrt(1/8/L)/0.5 ~ 1.1%: 5% on SW2 is safe.
    v = torch.tensor([1.0, 2.0], dtype=F64)
    assert M.sliced_w2(x, x + v, n_projections=4000) == pytest.approx(float(v.norm()) / math.sqrt(2), rel=0.05)
    # 1-D: the only directions are ±1, so sliced W2 equals W2 (also for unequal sizes)
    a, b = torch.randn(300, 1, generator=gen(17), dtype=F64), torch.rand(200, 1, generator=gen(18), dtype=F64)
    assert M.sliced_w2(a, b, n_projections=3) == pytest.approx(M.w2(a, b), rel=1e-12)
    assert M.sliced_w2(x, x + v, seed=1) == M.sliced_w2(x, x + v, seed=1)


# ----------------------------------------------------------------------------------------- MMD
def test_mmd():
    g = gen(19)
    x, y = torch.randn(2000, 2, generator=g, dtype=F64), torch.randn(2000, 2, generator=g, dtype=F64)
    z = torch.randn(2000, 2, generator=g, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    same, diff = M.mmd(x, y), M.mmd(x, z)
    assert abs(same) < 2e-3 and diff > 0.05
    # blocked sums equal the dense formula
    h = 0.8

    def K(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h))
    n = 2000
    dense = ((K(x, x).sum() - n) + (K(z, z).sum() - n)) / (n * (n - 1)) - 2 * K(x, z).mean()
    assert M.mmd(x, z, bandwidth=h) == pytest.approx(float(dense), rel=1e-10)


def test_mmd_unbiased():
    # the U-statistic has mean exactly 0 under one law; the biased V-statistic would have mean
    # ≈ 2(1 - E k(a, b))/n ≈ 0.022 here (n = 40), far above the tolerance
    vals = torch.tensor([M.mmd(torch.randn(40, 2, generator=gen(100 + r), dtype=F64),
                               torch.randn(40, 2, generator=gen(900 + r), dtype=F64), bandwidth=1.0)
                         for r in range(300)])
    assert abs(float(vals.mean())) < 5 * float(vals.std()) / math.sqrt(len(vals))
    assert float(vals.std()) / math.sqrt(len(vals)) < 2e-3


def test_mmd_errors():
    with pytest.raises(ValueError, match="at least 2"):
        M.mmd(torch.randn(1, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="bandwidth"):
        M.mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidth=-1.0)
    with pytest.raises(ValueError, match="y must have shape"):
        M.mmd(torch.randn(5, 2), torch.randn(5, 2, 2))


# ----------------------------------------------------------------------------------------- point clouds
def test_memorisation_ratio():
    g = gen(20)
    data = 4 * torch.randn(50, 2, generator=g, dtype=F64)
    copies = data[torch.randint(0, 50, (1000,), generator=g)] + 1e-4 * torch.randn(1000, 2, generator=g, dtype=F64)
    assert M.memorisation_ratio(copies, data) == 1.0
    far = torch.tensor([[1000.0, 0.0]], dtype=F64) + torch.randn(200, 2, generator=g, dtype=F64)
    assert M.memorisation_ratio(far, data) == 0.0          # nearest ≈ second nearest
    mid = (data[:-1] + data[1:]) / 2                       # midpoints: never much closer to one point
    assert M.memorisation_ratio(mid, data) < 0.2
    assert M.memorisation_ratio(torch.cat([copies[:300], far]), data) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least 2"):
        M.memorisation_ratio(copies, data[:1])


def test_recovered_weights_and_distance():
    g = gen(21)
    data = torch.tensor([[0, 0], [3, 0], [0, 3], [3, 3], [-3, 0]], dtype=F64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)
    n = 20000
    k = torch.multinomial(w, n, replacement=True, generator=g)
    s = data[k] + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)
    r = M.recovered_weights(s, data)
    assert r.shape == (5,) and r.dtype == F64 and float(r.sum()) == pytest.approx(1.0)
    assert ((r - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()
    # distance_to_support: offsets of known length, well under half the spacing
    off = torch.randn(n, 2, generator=g, dtype=F64)
    off = off / off.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=F64)
    dist = M.distance_to_support(data[k] + off, data)
    assert dist.shape == (n,) and torch.allclose(dist, off.norm(dim=1), rtol=0, atol=1e-12)
    assert M.distance_to_support(data, data).abs().max() == 0.0
    with pytest.raises(ValueError, match="same dimension"):
        M.distance_to_support(torch.zeros(3, 3), data)
    with pytest.raises(ValueError, match="data must hold at least 1"):
        M.recovered_weights(s, torch.zeros(0, 2))


# ----------------------------------------------------------------------------------------- review fixes
def test_hist_counts_a_point_just_below_the_upper_edge():
    """(x − lo)/(hi − lo)·b rounds up to b for the largest float below hi: the point is inside the grid and
    belongs to the last bin, not dropped as outside (the demo's grid [-1.6, 1.6], 50 bins)."""
    import numpy as np
    lo, hi = -1.6, 1.6
    x = float(np.nextafter(hi, -1))
    assert x < hi and (x - lo) / (hi - lo) * 50 == 50.0          # the rounding this guards against
    h = M._hist(torch.tensor([[x], [hi], [lo], [hi + 1e-9], [lo - 1e-9]], dtype=F64), [(lo, hi)], [50])
    assert h.sum() == 3 and h[-1] == 2 and h[0] == 1             # x and hi in the last bin; the outside two dropped
    # so a sample set sitting on the last bin's inside edge has KL 0 against itself, not log-of-nothing
    s = torch.full((4,), x, dtype=F64)
    assert M.kl_histogram(s, reference=s, bins=50, range=(lo, hi)) == 0.0


@pytest.mark.parametrize("floor", [1.0, 2.0, math.inf, math.nan, 0.0, -1e-3])
def test_kl_histogram_floor_must_be_a_probability_below_1(floor):
    x, y = torch.randn(200, generator=gen(0)), torch.randn(300, generator=gen(1))
    with pytest.raises(ValueError, match=r"floor must lie in \(0, 1\)"):
        M.kl_histogram(x, reference=y, floor=floor)
    # Σ_j max(p_j, floor) <= 1 + B·floor, so KL >= −log(1 + B·floor) (Gibbs): a tiny floor keeps it >= 0
    assert M.kl_histogram(x, reference=y, floor=1e-12) >= -1e-9
    assert M.kl_histogram(x, reference=y, bins=100, floor=0.5) >= -math.log(1 + 100 * 0.5)


def test_metric_arguments_are_checked_by_name():
    x, y = torch.randn(50, 2, generator=gen(0)), torch.randn(60, 2, generator=gen(1))
    x1, y1 = x[:, 0], y[:, 0]
    with pytest.raises(ValueError, match="bins must be a positive int or 2 positive ints, got 10.0"):
        M.kl_histogram(x, reference=y, bins=10.0)
    with pytest.raises(ValueError, match=r"range must be \(lo, hi\) for 1-D or"):
        M.kl_histogram(x, reference=y, range=(0, 1))               # a 1-D range for 2-D data
    with pytest.raises(ValueError, match="range must be"):
        M.kl_histogram(x1, reference=y1, range=("a", "b"))
    for seed in (2**64, -1, 1.7, math.nan, None, True):
        with pytest.raises(ValueError, match="seed must be"):
            M.w2(x1, y1, max_n=10, seed=seed)
        with pytest.raises(ValueError, match="seed must be"):
            M.sliced_w2(x, y, seed=seed)
    assert M.w2(x1, y1, max_n=10, seed=2**64 - 1) > 0             # the whole generator range is accepted
    for bw in ("a", [1, 2], object()):
        with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
            M.mmd(x, y, bandwidth=bw)
    for bad in ("abc", [["a", "b"]], [[1, 2], [3]], [[1, None]]):
        with pytest.raises(ValueError, match="x must be numeric"):
            M.w2(bad, y)
    assert M.w2([[0.0, 0.0]] * 3, [[3.0, 4.0]] * 3) == pytest.approx(5.0)   # lists of numbers still work
