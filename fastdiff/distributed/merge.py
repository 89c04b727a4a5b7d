"""The (L, ȳ) merge algebra shared by the sharded and the streamed point clouds, and one rank's local part."""
from __future__ import annotations

import torch

from .. import ops

# A float32 query's parts come back with L_c rounded to float32 (δL_c up to E = 2^-24·|L_c|), and the merge
# weights w_c = e^{L_c − L} carry that as a relative error: D_j moves by Σ_c w_c (δL_c − δL̄)(ȳ_cj − ȳ_j), which by
# Cauchy–Schwarz in the weights is at most
#   2E · sqrt(1 − 1/s) · sqrt(Σ_c w_c (ȳ_cj − ȳ_j)²)      (1/s = the top part's share; the δL's spread about the
#                                                            top part's is at most 2E on the other parts' share)
# Nothing when one part holds a row's mass or the parts agree; but a query far from the data at small σ has |L|
# of 1e4..1e7 with its mass split between distant parts, and D could move by a third of max|y|. Rows whose bound
# (with 64 nats for the parts below the top one; second-order terms are O(E²)) exceeds this fraction of max|y|,
# half of MATH.md §7's 1e-4·max|y|, are recomputed from float64 parts. The bound is the worst case of the
# rounding: a redone row's float32 merge is typically 10-100x closer than it.
F32_MERGE_TOL = 5e-5


def merge_partials(parts):
    """Merge per-part posteriors [(L_r [M], ȳ_r [M, d]) or None for an empty part] in float64, in list order:
    L = logsumexp_r L_r, ȳ = Σ_r e^{L_r − L} ȳ_r. The same algebra the all_reduce merge and the streaming
    merge use; exposed for checking."""
    live = [(L.to(torch.float64), y.to(torch.float64)) for L, y in (p for p in parts if p is not None)]
    if not live:
        raise ValueError("parts: every part is empty (nothing to merge)")
    m = torch.stack([L for L, _ in live]).amax(0)
    s = sum(torch.exp(L - m) for L, _ in live)
    acc = sum(torch.exp(L - m).unsqueeze(1) * y for L, y in live)
    return acc / s.unsqueeze(1), m + s.log()


def _affine_D(ybar64, x, alpha, c, bandwidth):
    """D = (1 − α²v/c)·ȳ + (αv/c)·x (MATH.md §5), applied once after the merge; ȳ when v = 0."""
    if not bandwidth:
        return ybar64
    return ybar64 * (1 - alpha * alpha * bandwidth / c) + (alpha * bandwidth / c) * x.to(torch.float64)


def local_posterior(x, data, alpha, c, log_weights, backend):
    """One fused call with bandwidth folded into σ_eff = √c (the logits see c = α²v + σ² only):
    (L [M] float64, ȳ [M, d] float64), or None when data is empty."""
    if data is None or data.shape[0] == 0:
        return None
    ybar, L = ops.posterior(x, data, alpha.view(-1), c.sqrt().view(-1), log_weights, 0.0, backend=backend)
    return L.to(torch.float64), ybar.to(torch.float64)


def float64_redo(x, ybar, m, s, q, ymax):
    """The rows (an index tensor, or None) of a float32 query x whose merge must be redone in float64, from the
    merged ȳ [M, d], m = max_c L_c, s = Σ_c e^{L_c − m} and q = Σ_c e^{L_c − m}·ȳ_c² [M, d] (float64, identical
    on every rank). ymax: max|y| over the data, or None (then |ȳ|∞, a lower bound, per row). One host read."""
    if x.dtype != torch.float32 or x.shape[0] == 0:
        return None
    spread = (q / s.unsqueeze(1) - ybar * ybar).amax(1).clamp_min(0).sqrt()     # max_j sqrt(Σ_c w_c (ȳ_cj − ȳ_j)²)
    others = ((s - 1) / s).clamp_min(0).sqrt()                                  # sqrt(1 − the top part's share)
    scale = ybar.abs().amax(1) if ymax is None else ymax
    idx = (2**-23 * (m.abs() + 64) * others * spread > F32_MERGE_TOL * scale).nonzero().view(-1)
    return idx if idx.numel() else None


def take_rows(v, idx):
    """Rows idx of a per-row [M, 1] coefficient (a shared [1, 1] one stays as it is)."""
    return v if v.shape[0] == 1 else v[idx]
