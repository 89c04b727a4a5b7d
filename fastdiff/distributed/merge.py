"""The (L, ȳ) merge algebra shared by the sharded and the streamed point clouds, and one rank's local part."""
from __future__ import annotations

import torch

from .. import ops

# A float32 query's parts come back with L_c rounded to float32 (up to 2^-24·|L_c| off), and the merge weights
# e^{L_c − L} carry that as a relative error: nothing when one part holds a row's mass, but a query far from the
# data at small σ has |L| of 1e4..1e7 with its mass split between parts, and D could move by a third of max|y|.
# First order, D moves by at most ~2^-21·|L|·(1 − 1/s)·max|y| (1/s = Σ_c e^{L_c − max L_c}⁻¹ is the largest
# part's share), so rows with |L|·(1 − 1/s) above this limit are recomputed in float64: the bound then stays
# near MATH.md §7's 1e-4·max|y| (and typical errors, of random sign, far below it).
F32_MERGE_LIMIT = 256.0


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


def float64_redo(x, m, s):
    """The rows (an index tensor, or None) of a float32 query x whose merge must be redone in float64, from the
    merged m = max_c L_c and s = Σ_c e^{L_c − m} (float64, identical on every rank). One host read."""
    if x.dtype != torch.float32 or x.shape[0] == 0:
        return None
    idx = (m.abs() * (1 - 1 / s) > F32_MERGE_LIMIT).nonzero().view(-1)
    return idx if idx.numel() else None


def take_rows(v, idx):
    """Rows idx of a per-row [M, 1] coefficient (a shared [1, 1] one stays as it is)."""
    return v if v.shape[0] == 1 else v[idx]
