"""Sample-quality metrics (MATH.md §8). Everything is computed in float64.

Inputs are torch tensors or numpy arrays of points [n, d] (a 1-D array is read as [n, 1]); they must
be non-empty and finite. Scalar metrics return a Python float, per-point metrics a float64 tensor.
Random choices (subsampling, projections) use a private CPU ``torch.Generator`` seeded by ``seed``.
POT (``pip install pot``) is optional, imported only inside the functions that use it.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ._checks import as_real
from .schedules import as_integer

__all__ = ["gaussian_kl", "kl_histogram", "w2", "w2_binned", "sliced_w2", "mmd",
           "memorisation_ratio", "recovered_weights", "distance_to_support"]

_F64 = torch.float64
_BLOCK = 1 << 20                      # entries per block of a nearest-neighbour distance matrix (8 MiB)
_TILE = 1024                          # MMD kernel tiles are _TILE x _TILE (8 MiB)


# ----------------------------------------------------------------------------------------- helpers
def _tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:                                          # lists -> float64 (not float32); strings, ragged lists refused
            x = np.asarray(x)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be numeric: an array-like of numbers [n, d]") from None
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    t = t.detach().to(_F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _points(x, name: str, min_n: int = 1) -> torch.Tensor:
    t = _tensor(x, name)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d] (or [n]), got {tuple(t.shape)}")
    if t.shape[0] < min_n or t.shape[1] == 0:
        raise ValueError(f"{name} must hold at least {min_n} point(s) of dimension >= 1, got shape {tuple(t.shape)}")
    return t


def _pair(x, y, nx: str, ny: str, min_n: int = 1):
    x, y = _points(x, nx, min_n), _points(y, ny, min_n)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{nx} and {ny} must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return x, y.to(x.device)


def _gen(seed) -> torch.Generator:
    # never int(seed): 1.7 would silently be 1, and torch wraps -1 to 2**64 - 1
    seed = as_integer(seed, "seed", 0, 2**64 - 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i − b_j|² by expansion (callers centre the data first), clamped at 0."""
    return torch.addmm((a * a).sum(1, keepdim=True), a, b.T, alpha=-2).add_((b * b).sum(1)).clamp_min_(0)


def _knn(samples, data, k: int):
    """k nearest data points of each sample: (distances [M, k] ascending, indices [M, k]); blocked over
    samples, candidates found by expansion then their distances recomputed exactly as |x − y|."""
    x, y = _pair(samples, data, "samples", "data")
    if y.shape[0] < k:
        raise ValueError(f"data must hold at least {k} point(s), got {y.shape[0]}")
    c = y.mean(0)
    x, y = x - c, y - c
    rows = max(1, _BLOCK // y.shape[0])
    idx = torch.cat([_sqdist(x[i:i + rows], y).topk(k, dim=1, largest=False).indices
                     for i in range(0, x.shape[0], rows)])
    d = (x.unsqueeze(1) - y[idx]).norm(dim=2)
    d, order = d.sort(dim=1)
    return d, idx.gather(1, order)


def _w2sq_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact squared W2 between empirical laws (equal weights) along the last axis of a [..., n] and
    b [..., m], each sorted ascending: ∫₀¹ (F_a⁻¹(u) − F_b⁻¹(u))² du with the step quantile functions,
    integrated exactly over the merged breakpoints {i/n} ∪ {j/m}."""
    n, m = a.shape[-1], b.shape[-1]
    if n == m:
        return ((a - b) ** 2).mean(-1)
    u = torch.cat([torch.arange(1, n + 1, dtype=_F64) / n, torch.arange(1, m + 1, dtype=_F64) / m]).unique()
    du = torch.diff(u, prepend=u.new_zeros(1))
    mid = (u - du / 2).to(a.device)
    ia = (mid * n).long().clamp_max(n - 1)
    ib = (mid * m).long().clamp_max(m - 1)
    return ((a[..., ia] - b[..., ib]) ** 2 * du.to(a.device)).sum(-1)


def _grid(rng, d: int, name: str = "range"):
    """Normalise a range to a list of d (lo, hi) float pairs."""
    shape = ValueError(f"{name} must be (lo, hi) for 1-D or ((xlo, xhi), (ylo, yhi)) for 2-D data, got {rng!r}")
    try:                                              # scalars where pairs belong: len() raises TypeError
        r = [rng] if d == 1 and len(rng) == 2 and not hasattr(rng[0], "__len__") else list(rng)
        if len(r) != d or any(len(p) != 2 for p in r):
            raise shape
        r = [(as_real(lo, name), as_real(hi, name)) for lo, hi in r]
    except TypeError:
        raise shape from None
    if not all(math.isfinite(lo) and math.isfinite(hi) and lo < hi for lo, hi in r):
        raise ValueError(f"{name} needs finite lo < hi on each axis, got {r}")
    return r


def _bins(bins, d: int):
    bad = ValueError(f"bins must be a positive int or {d} positive ints, got {bins!r}")
    try:
        b = [bins] * d if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool) else list(bins)
    except TypeError:                                 # a float or another non-iterable
        raise bad from None
    if len(b) != d or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in b):
        raise bad
    return [int(v) for v in b]


def _hist(x: torch.Tensor, rng, nb) -> torch.Tensor:
    """Counts of x [n, d] on the grid (bins nb[k] of equal width on rng[k]; the upper edge belongs to the
    last bin); points outside the grid are not counted. Returns a flat float64 tensor (row-major)."""
    flat = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    inside = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for k, ((lo, hi), b) in enumerate(zip(rng, nb, strict=True)):
        # inside is decided on the coordinate: the bin index of a point just below hi can round up to b
        inside &= (x[:, k] >= lo) & (x[:, k] <= hi)
        i = torch.floor((x[:, k] - lo) / (hi - lo) * b).long()
        flat = flat * b + i.clamp(0, b - 1)
    return torch.bincount(flat[inside], minlength=math.prod(nb)).to(_F64).cpu()


# ----------------------------------------------------------------------------------------- Gaussian KL
def gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL(N0 ‖ N1) = ½ [ tr(Σ1⁻¹Σ0) + (μ1 − μ0)ᵀ Σ1⁻¹ (μ1 − μ0) − d + log det Σ1 − log det Σ0 ], in float64.

    Means have shape [d], covariances [d, d] (tensor or numpy; for d = 1, scalars mean and *variance*
    are accepted). Σ1 must be symmetric positive definite (Cholesky; ValueError otherwise), solves use
    its Cholesky factor. Σ0 must be symmetric PSD; if it is singular the KL is +inf (N0 is not
    absolutely continuous w.r.t. N1) and ``math.inf`` is returned. Tiny negative round-off is clamped to 0."""
    def prep(mu, cov, i):
        mu, cov = _tensor(mu, f"mean{i}"), _tensor(cov, f"cov{i}")
        if mu.ndim == 0:
            mu = mu.reshape(1)
        if cov.ndim == 0:
            cov = cov.reshape(1, 1)
        if mu.ndim != 1 or mu.numel() == 0:
            raise ValueError(f"mean{i} must have shape [d] with d >= 1, got {tuple(mu.shape)}")
        d = mu.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov{i} must have shape [{d}, {d}] to match mean{i}, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-12 * float(cov.abs().max())):
            raise ValueError(f"cov{i} must be symmetric")
        return mu.cpu(), ((cov + cov.T) / 2).cpu()

    mu0, S0 = prep(mean0, cov0, 0)
    mu1, S1 = prep(mean1, cov1, 1)
    if mu0.numel() != mu1.numel():
        raise ValueError(f"mean0 and mean1 have different dimensions ({mu0.numel()} and {mu1.numel()})")
    d = mu0.numel()
    L1, info = torch.linalg.cholesky_ex(S1)
    if info:
        raise ValueError("cov1 must be positive definite (its Cholesky factorisation failed)")
    L0, info = torch.linalg.cholesky_ex(S0)
    if info:
        ev = torch.linalg.eigvalsh(S0)
        if ev[0] < -1e-10 * max(float(ev[-1].abs()), 1e-300):
            raise ValueError(f"cov0 must be positive semi-definite, smallest eigenvalue {float(ev[0]):.3g}")
        return math.inf
    A = torch.linalg.solve_triangular(L1, L0, upper=False)       # tr(Σ1⁻¹Σ0) = ‖L1⁻¹L0‖_F²
    r = torch.linalg.solve_triangular(L1, (mu1 - mu0).unsqueeze(1), upper=False)
    logdet = 2 * (torch.log(torch.diagonal(L1)).sum() - torch.log(torch.diagonal(L0)).sum())
    kl = 0.5 * (float((A * A).sum()) + float((r * r).sum()) - d + float(logdet))
    return max(kl, 0.0)


# ----------------------------------------------------------------------------------------- histogram KL
def kl_histogram(samples, density=None, reference=None, bins=100, range=None, floor: float = 1e-12) -> float:
    """KL(p̂ ‖ p) = Σ_{j: p̂_j > 0} p̂_j log(p̂_j / max(p_j, floor)) on a fixed grid, for 1-D or 2-D samples.

    Grid: ``bins`` (int, or one int per axis) equal-width bins per axis on ``range`` = (lo, hi) for 1-D,
    ((xlo, xhi), (ylo, yhi)) for 2-D; the upper edge belongs to the last bin. Default range: the
    reference's per-axis [min, max] in reference mode, the samples' in density mode, widened by 5% of
    its width on each side (0.5 if the width is 0). Pass ``range`` explicitly to compare several
    sample sets on one grid (with the samples' own range a method that collapses is judged on a small grid).

    p̂_j = (samples in bin j) / n with n the *total* number of samples: mass outside the grid is not
    renormalised away, it simply drops out (so if a fraction 1 − m lies outside, the estimate can be as
    low as m log m < 0; choose the grid to cover the data).
    p_j = probability of bin j under the truth, renormalised over the grid (Σ_j p_j = 1):
      * ``density``: a callable taking a float64 tensor [k, d] and returning the density (not the log)
        [k]; each bin's mass is integrated with an 8-point (1-D) or 4×4 (2-D) Gauss–Legendre rule;
      * ``reference``: a large sample of the truth; p_j = (reference points in bin j) / (reference
        points inside the grid).
    Exactly one of ``density``/``reference`` is required. p_j is floored at ``floor`` before the log; floor
    must lie in (0, 1) and should be much smaller than 1/(number of bins B): the floored p_j sum to at most
    1 + B·floor, so the estimate can fall to −log(1 + B·floor) < 0.
    Finite-sample bias is about (number of occupied bins − 1) / (2n)."""
    x = _points(samples, "samples")
    d = x.shape[1]
    if d > 2:
        raise ValueError(f"samples must be 1-D or 2-D, got dimension {d}")
    if (density is None) == (reference is None):
        raise ValueError("pass exactly one of density= (a callable) or reference= (a sample)")
    floor = as_real(floor, "floor")
    if not 0 < floor < 1:               # a probability; >= 1 (or inf) turned the KL negative or -inf
        raise ValueError(f"floor must lie in (0, 1) (a probability, much smaller than 1/number of bins), got {floor}")
    nb = _bins(bins, d)
    ref = None
    if reference is not None:
        ref = _points(reference, "reference").to(x.device)
        if ref.shape[1] != d:
            raise ValueError(f"reference must have dimension {d} like samples, got {ref.shape[1]}")
    if range is None:
        base = x if ref is None else ref
        lo, hi = base.min(0).values.tolist(), base.max(0).values.tolist()
        range = [(a - (0.05 * (b - a) or 0.5), b + (0.05 * (b - a) or 0.5)) for a, b in zip(lo, hi, strict=True)]
    rng = _grid(range, d)

    p_hat = _hist(x, rng, nb) / x.shape[0]
    if ref is not None:
        p = _hist(ref, rng, nb)
        if p.sum() == 0:
            raise ValueError("no reference point falls inside range")
    else:
        if not callable(density):
            raise ValueError("density must be a callable mapping a float64 tensor [k, d] to densities [k]")
        q = 8 if d == 1 else 4
        nodes, weights = np.polynomial.legendre.leggauss(q)             # on [−1, 1]
        t, w = torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)   # on [0, 1], weights sum to 1
        axes = []
        for (lo, hi), b in zip(rng, nb, strict=True):
            h = (hi - lo) / b
            axes.append(((lo + h * torch.arange(b, dtype=_F64)).unsqueeze(1) + h * t).reshape(-1))
        pts = torch.cartesian_prod(*axes).reshape(-1, d)                 # row-major over (bin, node)
        f = torch.as_tensor(density(pts)).to(_F64).cpu().reshape(-1)
        if f.numel() != pts.shape[0]:
            raise ValueError(f"density returned {f.numel()} values for {pts.shape[0]} points; expected one per point")
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("density returned negative, NaN or inf values")
        if d == 1:
            p = (f.reshape(nb[0], q) * w).sum(1)
        else:
            p = torch.einsum("aibj,i,j->ab", f.reshape(nb[0], q, nb[1], q), w, w).reshape(-1)
        if p.sum() <= 0:
            raise ValueError("density integrates to 0 over range")
    p = (p / p.sum()).clamp_min(float(floor))
    m = p_hat > 0
    return float((p_hat[m] * torch.log(p_hat[m] / p[m])).sum())


# ----------------------------------------------------------------------------------------- Wasserstein
def w2(x, y, max_n: int = 2000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance W2 (not squared) between the empirical laws (equal weights) of x [n, d]
    and y [m, d]: W2² = min over couplings π of Σ π_ij |x_i − y_j|².

    A set larger than ``max_n`` is first replaced by a uniformly random subset of ``max_n`` points
    (without replacement, generator seeded with ``seed``; x uses it first, then y). Solvers: d = 1 exactly
    by sorting (quantile functions, any sizes); otherwise POT's exact solver (``ot.emd``) if installed, else SciPy's
    ``linear_sum_assignment`` when both sets have the same size (an optimal coupling between equal-size
    uniform sets is a permutation); unequal sizes without POT raise ImportError (``pip install pot``)."""
    x, y = _pair(x, y, "x", "y")
    if isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n <= 0:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")
    g = _gen(seed)
    if x.shape[0] > max_n:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_n].to(x.device)]
    if y.shape[0] > max_n:
        y = y[torch.randperm(y.shape[0], generator=g)[:max_n].to(y.device)]
    if x.shape[1] == 1:
        return math.sqrt(float(_w2sq_1d(x[:, 0].sort().values, y[:, 0].sort().values)))
    c = torch.cat([x, y]).mean(0)
    M = _sqdist(x - c, y - c).cpu().numpy()
    try:
        import ot
    except ImportError:
        ot = None
    if ot is not None:
        a = np.full(x.shape[0], 1 / x.shape[0])
        b = np.full(y.shape[0], 1 / y.shape[0])
        plan = _emd(ot, a, b, M)
        i, j = np.nonzero(plan)
        mass = torch.from_numpy(plan[i, j]).to(x.device)
    elif x.shape[0] == y.shape[0]:
        from scipy.optimize import linear_sum_assignment
        i, j = linear_sum_assignment(M)
        mass = torch.full((len(i),), 1 / len(i), dtype=_F64, device=x.device)
    else:
        raise ImportError("w2 between sets of different sizes needs POT: pip install pot "
                          f"(got {x.shape[0]} and {y.shape[0]} points; or pass equal sizes / max_n)")
    return _plan_cost(x, y, i, j, mass)


def _emd(ot, a, b, M):
    """Optimal plan of the exact OT linear programme (POT's network simplex, as in ``ot.emd2``)."""
    plan, log = ot.emd(a, b, M, numItermax=100_000_000, log=True)
    if log.get("warning"):
        warnings.warn(f"POT emd: {log['warning']} (the W2 value may not be optimal)", RuntimeWarning, stacklevel=3)
    return plan


def _plan_cost(x, y, i, j, mass) -> float:
    """sqrt(Σ_k mass_k |x_{i_k} − y_{j_k}|²) over the plan's support, with exact differences (the
    expanded cost matrix used to find the plan carries ~1e-16 absolute error, ~1e-8 after the sqrt)."""
    i, j = torch.as_tensor(i, device=x.device), torch.as_tensor(j, device=x.device)
    return math.sqrt(float((mass * ((x[i] - y[j]) ** 2).sum(1)).sum()))


def w2_binned(x, y, bins: int = 64, range=((-3.5, 3.5), (-3.5, 3.5))) -> float:
    """The ODE–SDE gap paper's W2 between 2-D sample sets: each set is binned on a ``bins`` × ``bins``
    grid over ``range`` (equal-width bins, upper edge in the last bin); the binned law puts mass
    count_j / (points inside the grid) on bin centre c_j (points outside the grid are dropped). Returns
    W2 (not squared) = sqrt(min_π Σ π_jk |c_j − c_k|²), solved exactly with POT ``ot.emd`` (required:
    ``pip install pot``) over the occupied bins. The grid quantises positions to ± half a bin."""
    try:
        import ot
    except ImportError:
        raise ImportError("w2_binned needs POT (Python Optimal Transport): pip install pot") from None
    x, y = _pair(x, y, "x", "y")
    if x.shape[1] != 2:
        raise ValueError(f"x and y must be 2-D samples [n, 2], got dimension {x.shape[1]}")
    nb, rng = _bins(bins, 2), _grid(range, 2)
    centres = torch.cartesian_prod(*[lo + (hi - lo) * (torch.arange(b, dtype=_F64) + 0.5) / b
                                     for (lo, hi), b in zip(rng, nb, strict=True)])
    masses = []
    for t, name in ((x, "x"), (y, "y")):
        h = _hist(t, rng, nb)
        if h.sum() == 0:
            raise ValueError(f"no point of {name} falls inside range {rng}")
        masses.append(h / h.sum())
    (a, b) = masses
    ia, ib = a > 0, b > 0
    ca, cb = centres[ia], centres[ib]
    plan = _emd(ot, a[ia].numpy(), b[ib].numpy(), _sqdist(ca, cb).numpy())
    i, j = np.nonzero(plan)
    return _plan_cost(ca, cb, i, j, torch.from_numpy(plan[i, j]))


def sliced_w2(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 = sqrt( (1/L) Σ_l W2²(θ_lᵀx, θ_lᵀy) ), θ_l i.i.d. uniform on the unit sphere S^{d−1}
    (normalised Gaussians from a generator seeded with ``seed``), L = ``n_projections``. Each 1-D W2 is
    exact: sorted matching for equal sizes, otherwise the integral of the squared difference of the two
    step quantile functions over the merged breakpoints {i/n} ∪ {j/m}. Monte Carlo over directions
    approximates E_θ W2²(θᵀx, θᵀy); for a translate y = x + v this expectation is |v|²/d."""
    x, y = _pair(x, y, "x", "y")
    if isinstance(n_projections, bool) or not isinstance(n_projections, (int, np.integer)) or n_projections <= 0:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    theta = torch.randn(x.shape[1], n_projections, generator=_gen(seed), dtype=_F64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    c = torch.cat([x, y]).mean(0)
    px = ((x - c) @ theta).T.sort(dim=1).values
    py = ((y - c) @ theta).T.sort(dim=1).values
    return math.sqrt(max(float(_w2sq_1d(px, py).mean()), 0.0))


# ----------------------------------------------------------------------------------------- MMD
def mmd(x, y, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with the RBF kernel k(a, b) = exp(−|a − b|² / (2h²)):
      MMD²_u = Σ_{i≠i'} k(x_i, x_i') / (n(n−1)) + Σ_{j≠j'} k(y_j, y_j') / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / (nm)
    (it can be slightly negative). Needs n, m >= 2. Default h (``bandwidth=None``): the median of the
    pairwise distances |a − b|, a ≠ b, of the pooled sample x ∪ y — over all pairs if it has at most
    2000 points, else over a fixed random subset (seed 0) of 2000 of them. Computed in float64 in blocks
    of 1024 × 1024 kernel entries, so n = 20000 never allocates an n × n matrix."""
    x, y = _pair(x, y, "x", "y", min_n=2)
    c = torch.cat([x, y]).mean(0)
    x, y = x - c, y - c
    if bandwidth is None:
        z = torch.cat([x, y])
        if z.shape[0] > 2000:
            z = z[torch.randperm(z.shape[0], generator=_gen(0))[:2000].to(z.device)]
        h = float(torch.pdist(z).median())
        if h <= 0:
            raise ValueError("the median pairwise distance is 0 (mostly duplicate points); pass bandwidth=")
    else:
        try:
            h = as_real(bandwidth, "bandwidth")
        except TypeError:
            h = math.nan                              # a string or another non-number: the message below
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    gamma = 1 / (2 * h * h)

    def ksum(a, b, same):
        """Σ_{i,j} k(a_i, b_j), minus the diagonal if same (a is b); symmetric blocks counted once."""
        s, t = 0.0, _TILE
        for i in range(0, a.shape[0], t):
            for j in range(i if same else 0, b.shape[0], t):
                blk = float(_sqdist(a[i:i + t], b[j:j + t]).mul_(-gamma).exp_().sum())
                s += blk if not same or i == j else 2 * blk
        return s - a.shape[0] if same else s

    n, m = x.shape[0], y.shape[0]
    return ksum(x, x, True) / (n * (n - 1)) + ksum(y, y, True) / (m * (m - 1)) - 2 * ksum(x, y, False) / (n * m)


# ----------------------------------------------------------------------------------------- point clouds
def memorisation_ratio(samples, data, ratio: float = 1 / 3) -> float:
    """Fraction of samples x whose nearest data point is much closer than the second nearest:
    |x − y_(1)| < ratio · |x − y_(2)| (Euclidean; y_(1), y_(2) the two nearest of the N >= 2 data points).
    Exact nearest-neighbour search in float64, blocked over samples."""
    r = float(ratio)
    if not (math.isfinite(r) and 0 < r <= 1):
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    d, _ = _knn(samples, data, 2)
    return float((d[:, 0] < r * d[:, 1]).double().mean())


def recovered_weights(samples, data) -> torch.Tensor:
    """Recovered mixture weights (CEM paper §4.2): w_i = (number of samples whose nearest data point is
    y_i) / M, for i = 1..N; float64 tensor [N] summing to 1 (ties go to the lower index)."""
    _, idx = _knn(samples, data, 1)
    return torch.bincount(idx[:, 0].cpu(), minlength=_points(data, "data").shape[0]).to(_F64) / idx.shape[0]


def distance_to_support(samples, data) -> torch.Tensor:
    """Euclidean distance min_i |x − y_i| from each of the M samples to its nearest data point; float64 [M]."""
    d, _ = _knn(samples, data, 1)
    return d[:, 0]
