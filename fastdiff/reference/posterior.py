"""Plain-torch point-cloud posterior (MATH.md §5): the reference every kernel is checked against.

For queries x [M, d], data y [N, d], log-weights log π, bandwidth v and c = α²v + σ²:
  a_i = log π_i − |x − α y_i|²/(2c),   L = logsumexp_i a_i,   w_i = e^{a_i − L}
  D = (1 − α²v/c)·Σ w_i y_i + (αv/c)·x
One pass over the data in blocks with an online log-sum-exp: never more than one block of the
M×N logits exists. Distances are direct differences (not the |x|² − 2x·y + |y|² expansion), so the
result keeps the working precision at every σ.
"""
from __future__ import annotations

import torch

from .._checks import check_cloud, per_row64

_F32_SAFE_INV2C = 1e30   # beyond this 1/(2c) the float32 logits could overflow: work in float64


def _alpha_split(a64):
    """(c1, c2) with x − αy = (x − c1·y) + c2·y, as every kernel forms it: for α ≥ ½ (every process at small σ)
    c1 = 1 and c2 = 1 − α from float64, so x − y is exact in the working precision and only the small
    (1 − α)y term carries α's rounding; x − fl32(α)·y would move a logit at σ = 1e-3, d = 784 by ~2e-3
    (MATH.md §7 allows 1e-3). For α < ½, (0, −α): the plain form."""
    big = a64 >= 0.5
    return big.to(a64.dtype), torch.where(big, 1 - a64, -a64)


def _sq_dist(x, c1, c2, y):
    """|x_m − α_m y_n|² by direct differences, x − αy as (x − c1·y) + c2·y: [m, n].
    Small d sums column by column (no [m, n, d] tensor)."""
    if x.shape[1] <= 8:
        out = None
        for j in range(x.shape[1]):
            yj = y[:, j]
            diff = (x[:, j:j + 1] - c1 * yj) + c2 * yj
            out = diff * diff if out is None else out.addcmul_(diff, diff)
        return out
    y = y.unsqueeze(0)
    diff = (x.unsqueeze(1) - c1.unsqueeze(-1) * y) + c2.unsqueeze(-1) * y
    return (diff * diff).sum(-1)


def posterior(x: torch.Tensor, data: torch.Tensor, alpha, sigma, log_weights=None, bandwidth: float = 0.0,
              *, block_elems: int = 1 << 20):
    """Posterior mean D [M, d] and log-sum-exp L [M] of the point cloud `data` at queries `x`.

    alpha, sigma: scalars or per-row tensors [M]. data may be stored in any float dtype (upcast).
    L excludes the Gaussian normaliser: log p_t(x) = L − (d/2) log(2π c).
    """
    check_cloud(x, data, log_weights)
    M, d = x.shape
    N = data.shape[0]
    a64 = per_row64(alpha, "alpha", M, x.device).view(-1, 1)     # [M, 1] or [1, 1]
    s64 = per_row64(sigma, "sigma", M, x.device).view(-1, 1)
    if not bool((s64 > 0).all()):
        raise ValueError("sigma must be positive (D is never evaluated at t = 0)")
    v = float(bandwidth)
    if not v >= 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    c64 = a64 * a64 * v + s64 * s64
    inv2c64 = 0.5 / c64
    work = x.dtype
    if work == torch.float32 and float(inv2c64.max()) > _F32_SAFE_INV2C:
        work = torch.float64
    if log_weights is not None:
        lw = torch.as_tensor(log_weights, device=x.device)
        if lw.shape != (N,):
            raise ValueError(f"log_weights must have shape [N]=[{N}], got {tuple(lw.shape)}")
        if bool(torch.isnan(lw).any()) or bool((lw == float("inf")).any()):
            raise ValueError("log_weights contains NaN or +inf")
        if not bool(torch.isfinite(lw).any()):
            raise ValueError("log_weights gives every data point zero weight")
        lw = lw.to(work)
    xw, alpha_w, inv2c, c_w = x.to(work), a64.to(work), inv2c64.to(work), c64.to(work)
    c1_w, c2_w = (c.to(work) for c in _alpha_split(a64))

    # Blocks of about block_elems temporaries: [rows, cols] logits (and [rows, cols, d] differences for d > 8).
    per_pair = d if d > 8 else 1
    cols = max(1, min(N, 2048, block_elems // per_pair))
    rows = max(1, min(M, block_elems // (cols * per_pair)))
    D = torch.empty(M, d, dtype=work, device=x.device)
    L = torch.empty(M, dtype=work, device=x.device)
    for r0 in range(0, M, rows):
        xq = xw[r0:r0 + rows]
        aq = alpha_w if alpha_w.shape[0] == 1 else alpha_w[r0:r0 + rows]
        c1q = c1_w if c1_w.shape[0] == 1 else c1_w[r0:r0 + rows]
        c2q = c2_w if c2_w.shape[0] == 1 else c2_w[r0:r0 + rows]
        iq = inv2c if inv2c.shape[0] == 1 else inv2c[r0:r0 + rows]
        m = torch.full((xq.shape[0], 1), float("-inf"), dtype=work, device=x.device)   # running max
        s = torch.zeros_like(m)                                                          # Σ e^{a − m}
        acc = torch.zeros_like(xq)                                                       # Σ e^{a − m} y
        for c0 in range(0, N, cols):
            y = data[c0:c0 + cols].to(work)
            logits = -_sq_dist(xq, c1q, c2q, y) * iq
            if log_weights is not None:
                logits = logits + lw[c0:c0 + cols]
            new_m = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
            # A block of zero-weight points leaves new_m = −inf: keep the (empty) sums as they are.
            safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            scale = torch.exp(m - safe_m)
            p = torch.exp(logits - safe_m)
            s = s * scale + p.sum(1, keepdim=True)
            acc = acc * scale + p @ y
            m = new_m
        ybar = acc / s
        if v:   # kernel-density data: D = (1 − α²v/c) ȳ + (αv/c) x
            cq = c_w if c_w.shape[0] == 1 else c_w[r0:r0 + rows]
            D[r0:r0 + rows] = ybar * (1 - aq * aq * v / cq) + (aq * v / cq) * xq
        else:
            D[r0:r0 + rows] = ybar
        L[r0:r0 + rows] = (m + s.log()).squeeze(1)
    return D.to(x.dtype), L.to(x.dtype)
