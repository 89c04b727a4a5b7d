"""Toy data sets for diffusion sampling experiments, and a loader for user point clouds.

Every sampler is ``name(n, seed=0, dtype=torch.float32) -> Tensor [n, d]`` (two take one more argument:
``circle(n, radius=1.0, seed=0, ...)``, whose second positional argument is the radius, and
``swiss_roll(..., noise=0.0)``; pass ``seed=`` by name). It draws in float64 from
its own CPU ``torch.Generator`` seeded with ``seed`` (global RNG state is never touched), then casts to
``dtype``. Where the law is a Gaussian or a Gaussian mixture, ``<name>_params()`` returns
``(weights [K], means [K, d], covs [K, d, d])`` in float64 and the sampler draws exactly from that law:
component k ~ Categorical(weights), then x = mean_k + F_k z with z ~ N(0, I) and F_k F_kᵀ = cov_k.

The constants below are this project's definitions (the papers' exact constants were lost); each
docstring states the law exactly.

Registries: ``DATASETS`` (name -> sampler), ``PARAMS`` (name -> params function), ``get(name, n, ...)``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "swiss_roll", "gmm_1d", "gmm_1d_params", "gaussian_2d", "gaussian_2d_params", "line", "line_params",
    "spiral", "circle", "blob9", "blob9_params", "two_rings", "checkerboard",
    "DATASETS", "PARAMS", "get", "load",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------------------- helpers
def _check(n, seed, dtype) -> torch.Generator:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:                 # torch would wrap -1 to 2**64 - 1 (the same data) or overflow
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _check_noise(noise) -> float:
    noise = float(noise)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    return noise


def _sample_mixture(params, n: int, g: torch.Generator) -> torch.Tensor:
    """Exact draw from sum_k w_k N(mean_k, cov_k); cov_k may be singular (symmetric PSD square root)."""
    w, mu, cov = params
    k = torch.multinomial(w, n, replacement=True, generator=g)
    z = torch.randn(n, mu.shape[1], generator=g, dtype=_F64)
    lam, V = torch.linalg.eigh(cov)                                # PSD square root: works for rank-deficient covs
    F = V * lam.clamp_min(0).sqrt().unsqueeze(-2)                  # F F^T = cov
    return mu[k] + torch.einsum("nij,nj->ni", F[k], z)


# ----------------------------------------------------------------------------------------- datasets
def swiss_roll(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, noise: float = 0.0) -> torch.Tensor:
    """2-D Swiss roll: u ~ U(0, 1), t = 1.5π(1 + 2u) ∈ [1.5π, 4.5π],
    x = (t cos t, t sin t) / 10 + noise · ε,  ε ~ N(0, I₂)  (noise = 0 by default, so |x| = t/10 exactly).
    Shape [n, 2]."""
    g = _check(n, seed, dtype)
    noise = _check_noise(noise)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=_F64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 10
    if noise > 0:
        x = x + noise * torch.randn(n, 2, generator=g, dtype=_F64)
    return x.to(dtype)


def gmm_1d_params():
    """The drifted-VE paper's 1-D mixture: weights (0.2, 0.5, 0.3), means (−3, 0, 3), stds (0.5, 0.5, 0.5)."""
    w = torch.tensor([0.2, 0.5, 0.3], dtype=_F64)
    mu = torch.tensor([[-3.0], [0.0], [3.0]], dtype=_F64)
    cov = torch.full((3, 1, 1), 0.25, dtype=_F64)
    return w, mu, cov


def gmm_1d(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D Gaussian mixture p(x) = 0.2 N(−3, 0.5²) + 0.5 N(0, 0.5²) + 0.3 N(3, 0.5²) (`gmm_1d_params`). Shape [n, 1]."""
    g = _check(n, seed, dtype)
    return _sample_mixture(gmm_1d_params(), n, g).to(dtype)


def gaussian_2d_params():
    """One Gaussian: mean (1.0, −0.5), cov [[1.0, 0.6], [0.6, 0.5]] (correlation ≈ 0.85)."""
    return (torch.ones(1, dtype=_F64), torch.tensor([[1.0, -0.5]], dtype=_F64),
            torch.tensor([[[1.0, 0.6], [0.6, 0.5]]], dtype=_F64))


def gaussian_2d(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D Gaussian N((1.0, −0.5), [[1.0, 0.6], [0.6, 0.5]]) (`gaussian_2d_params`). Shape [n, 2]."""
    g = _check(n, seed, dtype)
    return _sample_mixture(gaussian_2d_params(), n, g).to(dtype)


def line_params():
    """The CEM paper's singular "line normal distribution": mean 0, cov [[1, 1], [1, 1]] (rank one)."""
    return (torch.ones(1, dtype=_F64), torch.zeros(1, 2, dtype=_F64),
            torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=_F64))


def line(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular Gaussian on the diagonal: x = z · (1, 1), z ~ N(0, 1), i.e. N(0, [[1, 1], [1, 1]])
    (`line_params`); x₁ == x₂ exactly. Shape [n, 2]."""
    g = _check(n, seed, dtype)
    z = torch.randn(n, 1, generator=g, dtype=_F64)
    return z.expand(n, 2).to(dtype)


def spiral(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CEM paper's curve (a 1-D spiral in 2-D): u ~ U(0, 1), θ = π(0.5 + 3u) ∈ [π/2, 3.5π],
    x = (2 / (3.5π)) · (θ cos θ, θ sin θ), so |x| = 2θ/(3.5π) ∈ [2/7, 2] and the curve lies in [−2, 2]².
    No noise. Shape [n, 2]."""
    g = _check(n, seed, dtype)
    th = math.pi * (0.5 + 3 * torch.rand(n, generator=g, dtype=_F64))
    return (2 / (3.5 * math.pi) * torch.stack([th * torch.cos(th), th * torch.sin(th)], dim=1)).to(dtype)


def circle(n: int = 8, radius: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n points on a circle (a point cloud, not a sampler): x_k = radius · (cos 2πk/n, sin 2πk/n),
    k = 0, ..., n−1. Deterministic: `seed` is accepted for a uniform signature and ignored. Shape [n, 2]."""
    _check(n, seed, dtype)
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    a = 2 * math.pi * torch.arange(n, dtype=_F64) / n
    return (radius * torch.stack([torch.cos(a), torch.sin(a)], dim=1)).to(dtype)


def blob9_params():
    """The ODE–SDE gap paper's blob: 9 equal-weight (1/9) isotropic Gaussians, std 0.3 (cov 0.09 I),
    centred on {−2, 0, 2}² (order: x-major, (−2,−2), (−2,0), (−2,2), (0,−2), ...)."""
    c = torch.tensor([-2.0, 0.0, 2.0], dtype=_F64)
    mu = torch.cartesian_prod(c, c)
    return torch.full((9,), 1 / 9, dtype=_F64), mu, 0.09 * torch.eye(2, dtype=_F64).expand(9, 2, 2).clone()


def blob9(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Equal mixture of 9 Gaussians N(c, 0.3² I), c ∈ {−2, 0, 2}² (`blob9_params`). Shape [n, 2]."""
    g = _check(n, seed, dtype)
    return _sample_mixture(blob9_params(), n, g).to(dtype)


def two_rings(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two concentric noisy rings: R ∈ {1.0, 2.0} with probability ½ each, θ ~ U(0, 2π), ε ~ N(0, 1),
    r = R + 0.08 ε, x = r · (cos θ, sin θ). Shape [n, 2]."""
    g = _check(n, seed, dtype)
    R = 1.0 + torch.randint(0, 2, (n,), generator=g).to(_F64)
    th = 2 * math.pi * torch.rand(n, generator=g, dtype=_F64)
    r = R + 0.08 * torch.randn(n, generator=g, dtype=_F64)
    return (r.unsqueeze(1) * torch.stack([torch.cos(th), torch.sin(th)], dim=1)).to(dtype)


# the 8 dark cells (lower-left corners) of the 4x4 board on [-2, 2)^2: floor(x) + floor(y) even
_DARK = torch.tensor([[i, j] for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=_F64)


def checkerboard(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform on the dark squares of a 4×4 checkerboard of unit squares covering [−2, 2)².
    Square [i, i+1) × [j, j+1), i, j ∈ {−2, −1, 0, 1}, is dark iff i + j is even, i.e. a point x is on a
    dark square iff floor(x₁) + floor(x₂) is even. The 8 dark squares (lower-left corners (−2,−2),
    (−2,0), (−1,−1), (−1,1), (0,−2), (0,0), (1,−1), (1,1)) each carry mass 1/8; density 1/8 there.
    Squares are half-open also after the cast to `dtype`. Shape [n, 2]."""
    g = _check(n, seed, dtype)
    corner = _DARK[torch.randint(0, 8, (n,), generator=g)]
    x = (corner + torch.rand(n, 2, generator=g, dtype=_F64)).to(dtype)
    c = corner.to(dtype)                       # rounding to dtype may land on the open upper edge: pull back
    return torch.minimum(x, torch.nextafter(c + 1, c))


DATASETS = {
    "swiss_roll": swiss_roll, "gmm_1d": gmm_1d, "gaussian_2d": gaussian_2d, "line": line, "spiral": spiral,
    "circle": circle, "blob9": blob9, "two_rings": two_rings, "checkerboard": checkerboard,
}
PARAMS = {"gmm_1d": gmm_1d_params, "gaussian_2d": gaussian_2d_params, "line": line_params, "blob9": blob9_params}


def get(name: str, n: int, seed: int = 0, **kw) -> torch.Tensor:
    """``DATASETS[name](n, seed=seed, **kw)`` with a helpful error for an unknown name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](n, seed=seed, **kw)


# ----------------------------------------------------------------------------------------- loading
def load(path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read a user's point cloud as a tensor [N, d] of `dtype`.

    Formats (by suffix, case-insensitive): ``.npy`` (numpy array, no pickles); ``.pt``/``.pth`` (a
    tensor, or a dict holding exactly one tensor; loaded with ``weights_only=True``); ``.csv``
    (UTF-8, with or without a BOM; comma-separated floats, one point per row, optionally one header row
    in which no cell is a number). A 1-D array becomes [N, 1]. Raises ValueError naming the file for an
    unknown suffix, a CSV that is not UTF-8, non-numeric, empty, non-2-D (after the 1-D rule) or
    non-finite data; FileNotFoundError if it does not exist."""
    p = Path(path)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".pt", ".pth", ".csv"):
        raise ValueError(f"{p}: unknown file suffix {p.suffix!r}; expected .npy, .pt, .pth or .csv")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # object arrays (need pickles), empty or truncated files
            raise ValueError(f"{p}: not a readable numeric .npy array ({type(e).__name__}: {e})") from None
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"{p}: expected a numeric (int or float) array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.asarray(arr, dtype=np.float64))
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:                        # empty, truncated, not a torch file, or pickled objects
            raise ValueError(f"{p}: not a readable torch file of tensors ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict):
            ts = [v for v in obj.values() if isinstance(v, torch.Tensor)]
            if len(ts) != 1:
                raise ValueError(f"{p}: a dict must hold exactly one tensor, found {len(ts)} (keys {list(obj)})")
            obj = ts[0]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{p}: expected a tensor or a dict with one tensor, got {type(obj).__name__}")
        if obj.is_complex() or obj.dtype == torch.bool:
            raise ValueError(f"{p}: expected a real numeric tensor, got dtype {obj.dtype}")
        x = obj.detach().to(_F64)
    else:
        x = _read_csv(p)
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if x.ndim != 2:
        raise ValueError(f"{p}: expected a 1-D or 2-D array of points, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{p}: the data are empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{p}: the data contain NaN or inf")
    out = x.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{p}: values up to {float(x.abs().max()):.3g} overflow {dtype}")
    return out


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(p: Path) -> torch.Tensor:
    try:                                               # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a UTF-8 text CSV ({e})") from None
    rows = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    out = []
    for k, (lineno, ln) in enumerate(rows):
        cells = ln.split(",")
        try:
            out.append([float(v) for v in cells])
        except ValueError:
            if k == 0 and not any(_number(v) for v in cells):
                continue                               # a single header row: no cell is a number
            raise ValueError(f"{p}: line {lineno} is not comma-separated numbers: {ln[:60]!r}") from None
    if not out:
        return torch.empty(0, 0, dtype=_F64)
    widths = {len(r) for r in out}
    if len(widths) != 1:
        raise ValueError(f"{p}: rows have different numbers of columns {sorted(widths)}")
    return torch.tensor(out, dtype=_F64)
