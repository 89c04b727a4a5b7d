"""Plain-torch point-cloud posterior (MATH.md §5): the reference every kernel is checked against.

For queries x [M, d], data y [N, d], log-weights log π, bandwidth v and c = α²v + σ²:
  a_i = log π_i − |x − α y_i|²/(2c),   L = logsumexp_i a_i,   w_i = e^{a_i − L}
  D = (1 − α²v/c)·Σ w_i y_i + (αv/c)·x
One pass over the data in blocks with an online log-sum-exp: never more than one block of the
M×N logits exists. Distances are direct differences (not the |x|² − 2x·y + |y|² expansion), so the
result keeps the working precision at every σ.

Finite for every finite input (the shared numeric rule): 1/(2c) is clamped to [smallest subnormal,
largest finite] of the working type, so a query on a data point never forms 0·inf (nor an overflowed
distance inf·0), and a point with finite log-weight keeps a logit ≥ −max_finite even when its squared
distance overflows. Float32 rows whose logits could overflow or lose their meaning run in float64
(fastdiff._precision, row by row).

Row-invariant bit for bit: row i's D and L never depend on which other rows are computed with it
(fastdiff.sample(..., chunk_size=k) equals the default). Torch's matrix product and reductions pick
their summation order from the whole tensor's shape (BLAS kernels for M = 1 differ from M = 64; CUDA
reductions split differently for few rows), so every sum here is a halving tree of elementwise adds
(the same for every row, and pairwise-accurate), and the maxima and elementwise functions (exp, log)
are exact or position-independent. Sums over the data are per block in the working precision and
merged across blocks in float64 (so L meets MATH.md §7 for any N).
"""
from __future__ import annotations

import torch

from .. import _precision
from .._checks import check_cloud, per_row64


def _alpha_split(a64):
    """(c1, c2) with x − αy = (x − c1·y) + c2·y, as every kernel forms it: for α ≥ ½ (every process at small σ)
    c1 = 1 and c2 = 1 − α from float64, so x − y is exact in the working precision and only the small
    (1 − α)y term carries α's rounding; x − fl32(α)·y would move a logit at σ = 1e-3, d = 784 by ~2e-3
    (MATH.md §7 allows 1e-3). For α < ½, (0, −α): the plain form."""
    big = a64 >= 0.5
    return big.to(a64.dtype), torch.where(big, 1 - a64, -a64)


def _tree_sum(t, dim):
    """Sum over `dim` by halving (t[:h] + t[h:2h], an odd last slice added into the first): the order depends
    only on the length of `dim`, never on the other dimensions, and the error grows as log2 of the length."""
    n = t.shape[dim]
    if n == 0:
        return t.sum(dim)
    while n > 1:
        h = n // 2
        head = t.narrow(dim, 0, h) + t.narrow(dim, h, h)
        if n % 2:
            head.narrow(dim, 0, 1).add_(t.narrow(dim, 2 * h, 1))
        t, n = head, h
    return t.squeeze(dim)


def _sq_dist(x, c1, c2, y):
    """|x_m − α_m y_n|² by direct differences, x − αy as (x − c1·y) + c2·y: [m, n].
    Small d sums column by column in order (no [m, n, d] tensor); larger d by a halving tree over d."""
    if x.shape[1] <= 8:
        out = None
        for j in range(x.shape[1]):
            yj = y[:, j]
            diff = (x[:, j:j + 1] - c1 * yj) + c2 * yj
            sq = diff * diff          # separate ops, never a fused multiply-add (whose rounding differs)
            out = sq if out is None else out + sq
        return out
    y = y.unsqueeze(0)
    diff = (x.unsqueeze(1) - c1.unsqueeze(-1) * y) + c2.unsqueeze(-1) * y
    return _tree_sum(diff * diff, 2)


def _weighted_sum(p, y):
    """Σ_n p[m, n] y[n] as [m, d] (a halving tree over n for every column)."""
    if y.shape[1] <= 8:
        return torch.stack([_tree_sum(p * y[:, j], 1) for j in range(y.shape[1])], 1)
    return _tree_sum(p.unsqueeze(-1) * y.unsqueeze(0), 1)


def _checked_log_weights(log_weights, N, device):
    lw = torch.as_tensor(log_weights, device=device)
    if lw.shape != (N,):
        raise ValueError(f"log_weights must have shape [N]=[{N}], got {tuple(lw.shape)}")
    if bool(torch.isnan(lw).any()) or bool((lw == float("inf")).any()):
        raise ValueError("log_weights contains NaN or +inf")
    if not bool(torch.isfinite(lw).any()):
        raise ValueError("log_weights gives every data point zero weight")
    return lw


def posterior(x: torch.Tensor, data: torch.Tensor, alpha, sigma, log_weights=None, bandwidth: float = 0.0,
              *, block_elems: int = 1 << 20):
    """Posterior mean D [M, d] and log-sum-exp L [M] of the point cloud `data` at queries `x`.

    alpha, sigma: scalars or per-row tensors [M]. data may be stored in any float dtype (upcast).
    L excludes the Gaussian normaliser: log p_t(x) = L − (d/2) log(2π c).
    """
    check_cloud(x, data, log_weights)
    M = x.shape[0]
    a64 = per_row64(alpha, "alpha", M, x.device)
    s64 = per_row64(sigma, "sigma", M, x.device)
    if not bool((s64 > 0).all()):
        raise ValueError("sigma must be positive (D is never evaluated at t = 0)")
    v = float(bandwidth)
    if not v >= 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    lw = None if log_weights is None else _checked_log_weights(log_weights, data.shape[0], x.device)
    need64 = _precision.float64_rows(x, data, a64, s64, v)
    if not bool(need64.any()):
        return _posterior(x, data, a64, s64, lw, v, block_elems)
    D, L = torch.empty_like(x), torch.empty(M, dtype=x.dtype, device=x.device)
    for r0, r1, promote in _precision.runs(need64):
        xr = x[r0:r1].to(torch.float64) if promote else x[r0:r1]
        Dr, Lr = _posterior(xr, data, _rows(a64, r0, r1), _rows(s64, r0, r1), lw, v, block_elems)
        D[r0:r1], L[r0:r1] = Dr, _precision.saturate(Lr, L.dtype)
    return D, L


def _rows(t, r0, r1):
    """Rows r0:r1 of a per-row [M] tensor; a broadcast [1] tensor as it is."""
    return t if t.numel() == 1 else t[r0:r1]


def _posterior(x, data, a64, s64, lw, v, block_elems):
    """The reduction in x's dtype (the caller has chosen it); a64, s64 float64 [1] or [M]."""
    M, d = x.shape
    N = data.shape[0]
    work = x.dtype
    fin = torch.finfo(work)
    a64, s64 = a64.view(-1, 1), s64.view(-1, 1)
    c64 = a64 * a64 * v + s64 * s64
    # Rule 1: 1/(2c) never inf (0·inf at distance 0) nor 0 (inf·0 for an overflowed distance); the lower
    # clamp moves a logit by at most max·subnormal (5e-7 in float32, 1e-15 in float64).
    inv2c64 = (0.5 / c64).clamp(min=fin.smallest_normal * fin.eps, max=fin.max)
    if lw is not None:
        lw = lw.to(work)
    xw, alpha_w, inv2c, c_w = x, a64.to(work), inv2c64.to(work), c64.to(work)
    c1_w, c2_w = (c.to(work) for c in _alpha_split(a64))

    # Blocks of about block_elems temporaries: [rows, cols] logits (and [rows, cols, d] differences for d > 8).
    per_pair = d if d > 8 else 1
    cols = max(1, min(N, 2048, block_elems // per_pair))
    rows = max(1, min(M, block_elems // (cols * per_pair)))
    D = torch.empty(M, d, dtype=work, device=x.device)
    L = torch.empty(M, dtype=work, device=x.device)
    f64 = torch.float64
    for r0 in range(0, M, rows):
        xq = xw[r0:r0 + rows]
        aq = alpha_w if alpha_w.shape[0] == 1 else alpha_w[r0:r0 + rows]
        c1q = c1_w if c1_w.shape[0] == 1 else c1_w[r0:r0 + rows]
        c2q = c2_w if c2_w.shape[0] == 1 else c2_w[r0:r0 + rows]
        iq = inv2c if inv2c.shape[0] == 1 else inv2c[r0:r0 + rows]
        m = torch.full((xq.shape[0], 1), float("-inf"), dtype=work, device=x.device)   # running max
        s = torch.zeros(xq.shape[0], 1, dtype=f64, device=x.device)                     # Σ e^{a − m}
        acc = torch.zeros(xq.shape[0], d, dtype=f64, device=x.device)                   # Σ e^{a − m} y
        for c0 in range(0, N, cols):
            y = data[c0:c0 + cols].to(work)
            # Rule 2: a finite-weight point keeps a logit ≥ −max even when its distance overflowed.
            logits = (-_sq_dist(xq, c1q, c2q, y) * iq).clamp_(min=-fin.max)
            if lw is not None:
                lwb = lw[c0:c0 + cols]
                logits = torch.where(lwb == float("-inf"), lwb, (logits + lwb).clamp_(min=-fin.max))
            new_m = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
            # A block of zero-weight points leaves new_m = −inf: keep the (empty) sums as they are.
            safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            scale = torch.exp(m.to(f64) - safe_m.to(f64))
            p = torch.exp(logits - safe_m)
            s = s * scale + _tree_sum(p, 1).unsqueeze(1).to(f64)
            acc = acc * scale + _weighted_sum(p, y).to(f64)
            m = new_m
        ybar = (acc / s).to(work)
        if v:   # kernel-density data: D = (1 − α²v/c) ȳ + (αv/c) x
            cq = c_w if c_w.shape[0] == 1 else c_w[r0:r0 + rows]
            D[r0:r0 + rows] = ybar * (1 - aq * aq * v / cq) + (aq * v / cq) * xq
        else:
            D[r0:r0 + rows] = ybar
        L[r0:r0 + rows] = (m.to(f64) + s.log()).squeeze(1).to(work)
    return D, L
