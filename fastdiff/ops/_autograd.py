"""Autograd for fastdiff.ops: one set of rules for every backend (torch reference included).

The forward runs the selected backend's kernel with grad mode off; the backward is computed here, in float64
from the inputs, so it does not depend on the backend (nor on its working precision). Gradients flow to x
(and to D and the history's D's for affine_step). No double backward: a second derivative through posterior or
pointcloud_step raises (affine_step is linear, its gradient exact at any order).

Posterior (MATH.md §5), with a_i = log π_i − |x − α y_i|²/(2c), w = softmax(a), ȳ = Σ w_i y_i, c = α²v + σ²:
  ∂L/∂x = (α ȳ − x)/c                         (the score ∇ log p_t(x): the Gaussian normaliser is constant in x)
  ∂ȳ/∂x = (α/c)·Cov_w(y)                      (Cov_w(y) = Σ w_i (y_i − ȳ)(y_i − ȳ)ᵀ, symmetric)
  D = (σ²/c)·ȳ + (αv/c)·x  ⇒  ∂D/∂x = (σ²α/c²)·Cov_w(y) + (αv/c)·I
The covariance product is taken in a second pass over the data (per row block: an online log-sum-exp pass for
the weights and ȳ, then Σ w_i (y_i − ȳ)·((y_i − ȳ)·g)), never forming M×N×d; the data are centred on their
mean first (x − αy = (x − αμ) − α(y − μ)), so a cloud far from the origin does not cancel digits.
"""
from __future__ import annotations

import functools

import torch

from .._checks import per_row64

_F64 = torch.float64
_MAX64 = torch.finfo(_F64).max


def grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _sq_dist(xq, aq, y):
    """|x_m − α_m y_n|² by direct differences: [m, n] (column by column for small d)."""
    if xq.shape[1] <= 8:
        out = torch.zeros(xq.shape[0], y.shape[0], dtype=_F64, device=xq.device)
        for j in range(xq.shape[1]):
            diff = xq[:, j:j + 1] - aq * y[:, j]
            out.addcmul_(diff, diff)
        return out
    diff = xq.unsqueeze(1) - aq.unsqueeze(-1) * y.unsqueeze(0)
    return (diff * diff).sum(-1)


def _logits(xq, aq, iq, y, lw):
    """The forward's logits (the shared numeric rule: inv2c clamped, finite-weight logits ≥ −max)."""
    t = -_sq_dist(xq, aq, y) * iq
    if lw is None:
        return t.clamp_min(-_MAX64)
    return torch.where(lw == -torch.inf, lw.expand_as(t), (t + lw).clamp_min(-_MAX64))


def posterior_vjp(x, data, alpha, sigma, log_weights, bandwidth, gD, gL, block_elems: int = 1 << 20):
    """x̄ = (∂D/∂x)ᵀ gD + (∂L/∂x)ᵀ gL for the point-cloud posterior, as a float64 [M, d] tensor.
    gD [M, d] or None, gL [M] or None."""
    M, d = x.shape
    N = data.shape[0]
    dev = x.device
    a = per_row64(alpha, "alpha", M, dev).view(-1, 1)
    s = per_row64(sigma, "sigma", M, dev).view(-1, 1)
    v = float(bandwidth)
    c = a * a * v + s * s
    inv2c = (0.5 / c).clamp_max(_MAX64)
    mu = data.to(_F64).mean(0)
    xs = x.detach().to(_F64) - a * mu                    # x − αμ: distances to the centred data are unchanged
    lw = None if log_weights is None else log_weights.detach().to(dev, _F64)
    gD = None if gD is None else gD.to(_F64)
    gL = None if gL is None else gL.to(_F64)
    per_pair = d if d > 8 else 1
    cols = max(1, min(N, 2048, block_elems // per_pair))
    rows = max(1, min(M, block_elems // (cols * per_pair)))
    blocks = [(c0, data[c0:c0 + cols].to(_F64) - mu, None if lw is None else lw[c0:c0 + cols])
              for c0 in range(0, N, cols)] if N <= cols * 4 else None   # small clouds: centre once
    out = torch.zeros(M, d, dtype=_F64, device=dev)
    for r0 in range(0, M, rows):
        sl = slice(r0, r0 + rows)
        xq = xs[sl]
        aq, iq, cq, sq = (t if t.shape[0] == 1 else t[sl] for t in (a, inv2c, c, s))   # scalar or per-row

        def data_blocks():
            if blocks is not None:
                yield from blocks
            else:
                for c0 in range(0, N, cols):
                    yield c0, data[c0:c0 + cols].to(_F64) - mu, None if lw is None else lw[c0:c0 + cols]

        # pass 1: online log-sum-exp, Σ e^{a − m} y
        m = torch.full((xq.shape[0], 1), -torch.inf, dtype=_F64, device=dev)
        tot = torch.zeros_like(m)
        acc = torch.zeros_like(xq)
        for _, y, lwb in data_blocks():
            lg = _logits(xq, aq, iq, y, lwb)
            new_m = torch.maximum(m, lg.max(1, keepdim=True).values)
            safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            scale, p = torch.exp(m - safe), torch.exp(lg - safe)
            tot, acc, m = tot * scale + p.sum(1, keepdim=True), acc * scale + p @ y, new_m
        ybar = acc / tot                                  # centred ȳ − μ
        gx = torch.zeros_like(xq)
        if gL is not None:
            gx += gL[sl].unsqueeze(1) * (aq * ybar - xq) / cq
        if gD is not None:
            g = gD[sl]
            # pass 2: Cov_w(y)·g = Σ w_i (y_i − ȳ)((y_i − ȳ)·g)
            cov_g = torch.zeros_like(xq)
            for _, y, lwb in data_blocks():
                w = torch.exp(_logits(xq, aq, iq, y, lwb) - m) / tot            # [rows, cols]
                proj = g @ y.T - (ybar * g).sum(1, keepdim=True)                  # (y_i − ȳ)·g
                wp = w * proj
                cov_g += wp @ y - ybar * wp.sum(1, keepdim=True)
            gx += (sq * sq * aq / (cq * cq)) * cov_g + (aq * v / cq) * g
        out[sl] = gx
    return out


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a first-order gradient on; differentiating it again raises. The VJP is computed outside autograd,
    so its own derivative would silently be zero (a gradient penalty would get a wrong x.grad)."""

    @staticmethod
    def forward(ctx, g, x, name):
        ctx.name = name
        return g.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"fastdiff.ops.{ctx.name} has no double backward (its gradient was taken with "
                           "create_graph=True and then differentiated again)")


def _first_order(name):
    """once_differentiable for a backward whose gradient depends on x nonlinearly: under create_graph=True the
    gradient stays connected to x through _NoDoubleBackward, so a second backward raises instead of dropping the
    Hessian term (once_differentiable only refuses when the incoming gradient itself requires grad)."""
    def wrap(backward):
        @functools.wraps(backward)
        def inner(ctx, *grads):
            create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not create_graph or out[0] is None:
                return out
            (x,) = ctx.saved_tensors
            return (_NoDoubleBackward.apply(out[0], x, name), *out[1:])
        return inner
    return wrap


class _Posterior(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, run, data, alpha, sigma, log_weights, bandwidth):
        ctx.args = (data, alpha, sigma, log_weights, bandwidth)
        ctx.save_for_backward(x)
        return run(x.detach(), data, alpha, sigma, log_weights, bandwidth)

    @staticmethod
    @_first_order("posterior")
    def backward(ctx, gD, gL):
        (x,) = ctx.saved_tensors
        data, alpha, sigma, log_weights, bandwidth = ctx.args
        gx = posterior_vjp(x, data, alpha, sigma, log_weights, bandwidth, gD, gL)
        return gx.to(x.dtype), None, None, None, None, None, None


class _AffineStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, D, D1, D2, run, A, B, B1, B2):
        ctx.coeffs = (A, B, B1, B2)
        ctx.dtypes = (D.dtype, None if D1 is None else D1.dtype, None if D2 is None else D2.dtype)
        hist = [h.detach() for h in (D1, D2) if h is not None]
        return run(x.detach(), D.detach(), *hist)

    @staticmethod
    def backward(ctx, g):
        # linear: A·g, B·g, B_j·g in differentiable torch ops, so a second derivative (through g) is exact too
        A, B, B1, B2 = ctx.coeffs
        g64 = g.to(_F64)
        need = ctx.needs_input_grad
        gx = (g64 * A).to(g.dtype) if need[0] else None
        gD = [(g64 * c).to(dt) if need[i + 1] else None
              for i, (c, dt) in enumerate(zip((B, B1, B2), ctx.dtypes, strict=True))]
        return gx, *gD, None, None, None, None, None


class _PointcloudStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, run, data, alpha, sigma, A, B, log_weights, bandwidth):
        ctx.args = (data, alpha, sigma, log_weights, bandwidth)
        ctx.coeffs = (A, B)
        ctx.save_for_backward(x)
        return run(x.detach())

    @staticmethod
    @_first_order("pointcloud_step")
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        A, B = ctx.coeffs
        data, alpha, sigma, log_weights, bandwidth = ctx.args
        g64 = g.to(_F64)
        gx = A * g64 + posterior_vjp(x, data, alpha, sigma, log_weights, bandwidth, B * g64, None)
        return gx.to(x.dtype), None, None, None, None, None, None, None, None


def posterior(run, x, data, alpha, sigma, log_weights, bandwidth):
    """run(x, data, alpha, sigma, log_weights, bandwidth) -> (D, L), differentiable in x when x requires grad."""
    if grad_needed(x):
        return _Posterior.apply(x, run, data, alpha, sigma, log_weights, bandwidth)
    return run(x, data, alpha, sigma, log_weights, bandwidth)


def affine_step(run, x, D, A: float, B: float, history=(), coeffs=()):
    """run(x, D, *history) -> A x + B D + C z + Σ B_j D_j, differentiable in x, D and the history's D_j
    (gradients A·g, B·g and B_j·g)."""
    if grad_needed(x, D, *history):
        D1, D2 = (list(history) + [None, None])[:2]
        B1, B2 = (list(coeffs) + [0.0, 0.0])[:2]
        return _AffineStep.apply(x, D, D1, D2, run, A, B, B1, B2)
    return run(x, D, *history)


def pointcloud_step(run, x, data, alpha, sigma, A: float, B: float, log_weights, bandwidth):
    """run(x) -> A x + B D(x) + C z, differentiable in x (A·g + (∂D/∂x)ᵀ B·g)."""
    if grad_needed(x):
        return _PointcloudStep.apply(x, run, data, alpha, sigma, A, B, log_weights, bandwidth)
    return run(x)
