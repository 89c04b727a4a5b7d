"""The (L, ȳ) merge algebra shared by the sharded and the streamed point clouds, and one rank's local part."""
from __future__ import annotations

import torch

from .. import ops


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
