"""Public kernel ops with backend dispatch (DESIGN.md "Kernels"). `backend="torch"` is the plain-torch
reference; `auto` picks the fastest backend that accepts the inputs (see fastdiff._backend).

The same contract on every backend:
- Inputs are validated here, once, before anything runs or is written (fastdiff._checks): bad shapes, dtypes,
  devices, NaN/inf and out-of-range values raise ValueError/TypeError naming the argument, and the caller's
  tensors (x, out) are then unchanged. x needs d >= 1 columns; M = 0 rows is a no-op (empty results).
- Any strides: x, D, data and out may be non-contiguous; an in-place update (out=x, or pointcloud_sample's x)
  writes the caller's tensor whatever its layout.
- Noise counters: seed in [0, 2**64), step in [0, 2**32), sample_offset >= 0 with sample_offset + M < 2**63
  (global sample indices are int64 on every backend).
- Autograd: gradients flow to x (posterior: D and L; pointcloud_step) and to x, D and the history's D's
  (affine_step), computed by fastdiff.ops._autograd in float64 from the inputs, identically for every backend
  (posterior and pointcloud_step: first order only, a second derivative raises; affine_step is linear, exact at
  any order). dL/dx is the score (alpha*D - x)/c for bandwidth 0. data, log_weights, alpha, sigma and
  the coefficients get no gradient: passing one that requires grad raises. pointcloud_sample (in place) has
  no backward and raises when x requires grad; out= raises when x, D or out requires grad. Under
  torch.no_grad() nothing is recorded and every op runs as usual.
- torch.compile: while being compiled, each function calls its torch.library custom op (fastdiff.ops._library),
  whose implementation is this eager function, so a compiled loop has no graph break and computes the same bits.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _checks, _precision
from . import _autograd, _library

__all__ = ["posterior", "affine_step", "affine_stepper", "pointcloud_step", "pointcloud_sample"]


def _check_cloud_call(x, data, alpha, sigma, log_weights, bandwidth):
    """Every check of a point-cloud op (shapes, devices, values), before anything runs; returns alpha and sigma
    as float64 tensors [1] or [M], bandwidth as a float (the backends' normalised arguments), and the value
    scans' (min, max) of x and data, which the float32/float64 rule reuses (_precision: no second scan)."""
    _checks.check_cloud_args(x, data, log_weights)
    alpha, sigma = _checks.check_times(alpha, sigma, x.shape[0], x.device)
    bandwidth = _checks.check_bandwidth(bandwidth)
    checked = _checks.check_values(x=x, data=data, log_weights=log_weights)
    return alpha, sigma, bandwidth, {k: checked.absmax(k) for k in ("x", "data")}


def _into(out, result):
    """Write result into the caller's out (any strides) and return out; or return result when out is None."""
    if out is None:
        return result
    if result is not out:
        out.copy_(result)
    return out


def posterior(x, data, alpha, sigma, log_weights=None, bandwidth: float = 0.0, *, backend: str = "auto"):
    """Point-cloud posterior mean D [M, d] and log-sum-exp L [M] (docs/math.md §5).

    alpha, sigma: scalars or per-row [M]; data may be stored in any float dtype (upcast to x's).
    """
    if torch.compiler.is_compiling():   # traced as one custom op (fastdiff.ops._library): no graph break
        return _library.posterior(x, data, alpha, sigma, log_weights, bandwidth, backend=backend)
    alpha, sigma, bandwidth, absmax = _check_cloud_call(x, data, alpha, sigma, log_weights, bandwidth)
    impl = _backend.select("posterior", backend, **_backend.facts(x))
    if x.shape[0] == 0:
        return _autograd.posterior(_empty_posterior, x, data, alpha, sigma, log_weights, bandwidth)

    def run(xx, data, alpha, sigma, log_weights, bandwidth):
        return _precision.posterior(impl, backend, xx.contiguous(), data.contiguous(), alpha, sigma, log_weights,
                                    bandwidth, absmax=absmax)
    return _autograd.posterior(run, x, data, alpha, sigma, log_weights, bandwidth)


def _empty_posterior(x, data, *_):
    return x.new_empty(x.shape), x.new_empty(0)


def affine_step(x, D, A, B, C, seed: int, step: int, sample_offset: int = 0, *, out=None, history=(),
                backend: str = "auto", check_values: bool = True):
    """x_s = A·x + B·D + C·z with z from the noise contract (row i is global sample sample_offset + i), plus the
    multistep history: history=((B1, D1), (B2, D2)) (up to two pairs, numbers and tensors like D) adds B1·D1 and
    then B2·D2 after the one-step update, in that order (a zero coefficient adds nothing; history=() keeps every
    bit of the one-step update). A, B, C: numbers. Pass out=x for an in-place update (any strides).
    Differentiable in x, D and the history's D's.

    check_values=False skips the NaN/inf scan of x, D and the history (on a CUDA device the scan waits for the
    GPU): for a loop that checks its result once at the end, as fd.sample does. Every other check still runs."""
    if torch.compiler.is_compiling():
        return _library.affine_step(x, D, A, B, C, seed, step, sample_offset, out=out, history=history,
                                    backend=backend)
    _checks.check_points_shape(x, "x")
    _checks.check_floating(D, "D", x.shape)
    _checks.check_same_device(x=x, D=D, out=out)
    A, B, C = (_checks.check_number(v, n) for v, n in ((A, "A"), (B, "B"), (C, "C")))
    pairs = check_history(history, x)
    coeffs = [_checks.check_number(Bj, f"history[{j}] B") for j, (Bj, _) in enumerate(pairs)]
    hist_D = [Dj for _, Dj in pairs]
    seed, sample_offset, step = _checks.check_counters(seed, sample_offset, x.shape[0], step)
    _checks.check_out(out, x, x, D, *hist_D)
    if check_values:
        _checks.check_values(x=x, D=D)
        _check_history_values(hist_D)
    impl = _backend.select("affine_step", backend, **_backend.facts(x))
    if x.shape[0] == 0:
        return _into(out, _autograd.affine_step(lambda xx, *_: xx.new_empty(xx.shape), x, D, A, B, hist_D, coeffs))
    # Compute straight into a contiguous out (nothing can fail once the inputs are checked); a strided out, or
    # one sharing memory with D or a history D (the backends write the one-step update before they read the
    # history), gets the result copied in. out=x is fine: each element of x is read before it is written.
    direct = out if out is not None and out.is_contiguous() and not _shares_memory(out, D, *hist_D) else None
    B1, B2 = (coeffs + [0.0, 0.0])[:2]

    def run(xx, DD, D1=None, D2=None):
        D1, D2 = (None if h is None else h.contiguous() for h in (D1, D2))
        return impl.affine_step(xx.contiguous(), DD.contiguous(), A, B, C, seed, step, sample_offset, direct,
                                D1, B1, D2, B2)
    return _into(out, _autograd.affine_step(run, x, D, A, B, hist_D, coeffs))


def _shares_memory(out, *tensors) -> bool:
    """Whether out's storage is that of any of tensors (a view of it counts: conservative, never wrong)."""
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in tensors)


def affine_stepper(x, seed: int, sample_offset: int, steps: int, *, backend: str = "auto"):
    """affine_step(..., out=x) for a sampling loop that updates one state in place, with the per-run checks
    done once: x (contiguous, no gradient wanted), the backend, and the counters for steps 0..steps-1.
    Returns step(k, D, A, B, C, history=()) for step k, which checks only that D (and each history D) is
    shaped, typed and placed like x; A, B, C and the history's B's must be finite floats (a checked table's).
    For loops that check their result once at the end, as fd.sample's model loop does: affine_step's full
    checks cost ~15 µs a step, as much as a small network's whole loop overhead. Eager only (it calls the
    extension directly, not a custom op): under torch.compile, call affine_step."""
    _checks.check_points_shape(x, "x")
    if not x.is_contiguous() or x.requires_grad:
        raise ValueError("affine_stepper updates x in place: x must be contiguous and not require grad")
    seed, sample_offset, _ = _checks.check_counters(seed, sample_offset, x.shape[0], steps=steps)
    impl = _backend.select("affine_step", backend, **_backend.facts(x))

    def like_x(D, name):
        if not isinstance(D, torch.Tensor) or D.shape != x.shape or D.dtype != x.dtype or D.device != x.device:
            raise ValueError(f"{name} must be a tensor like x ({tuple(x.shape)}, {x.dtype}, {x.device})")
        return D.contiguous()

    def step(k, D, A, B, C, history=()):
        if not 0 <= k < steps:
            raise ValueError(f"step must be in [0, {steps}), got {k}")
        (B1, D1), (B2, D2) = (tuple(history) + ((0.0, None), (0.0, None)))[:2]
        D, D1, D2 = (None if h is None else like_x(h, n) for h, n in ((D, "D"), (D1, "history D1"),
                                                                      (D2, "history D2")))
        if x.shape[0] == 0:
            return x
        return impl.affine_step(x, D, A, B, C, seed, k, sample_offset, x, D1, B1, D2, B2)
    return step


def check_history(history, x):
    """The structure of affine_step's history (metadata only, also at trace time): () or up to two (B_j, D_j)
    pairs, D_j a floating tensor shaped and placed like x. Returns the pairs as a list of tuples."""
    if isinstance(history, torch.Tensor) or not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple of up to two (B, D) pairs, got {type(history).__name__}")
    if len(history) > 2:
        raise ValueError(f"history holds at most two (B, D) pairs (D_{{k-1}}, D_{{k-2}}), got {len(history)}")
    pairs = []
    for j, pair in enumerate(history):
        if isinstance(pair, torch.Tensor) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"history[{j}] must be a (B, D) pair: a number and a tensor like D")
        Bj, Dj = pair
        _checks.check_floating(Dj, f"history[{j}] D", x.shape)
        if Dj.device != x.device:
            raise ValueError(f"history[{j}] D is on {Dj.device} but x is on {x.device}")
        pairs.append((Bj, Dj))
    return pairs


def _check_history_values(hist_D):
    ends = _checks.minmax(**{f"history[{j}] D": Dj for j, Dj in enumerate(hist_D)})
    for name, e in ends.items():
        if e is not None and not (math.isfinite(e[0]) and math.isfinite(e[1])):
            raise ValueError(f"{name} contains NaN or inf")


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed: int, step: int, sample_offset: int = 0,
                    log_weights=None, bandwidth: float = 0.0, *, out=None, backend: str = "auto"):
    """The fused step: D of the point cloud at scalar (alpha, sigma), then x_s = A x + B D + C z.
    out=x updates in place (any strides). Differentiable in x."""
    if torch.compiler.is_compiling():
        return _library.pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights,
                                        bandwidth, out=out, backend=backend)
    alpha, sigma, bandwidth, absmax = _check_cloud_call(x, data, alpha, sigma, log_weights, bandwidth)
    for name, value in (("alpha", alpha), ("sigma", sigma)):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number (pointcloud_step runs one time step), got shape "
                             f"{tuple(value.shape)}")
    A, B, C = (_checks.check_number(v, n) for v, n in ((A, "A"), (B, "B"), (C, "C")))
    seed, sample_offset, step = _checks.check_counters(seed, sample_offset, x.shape[0], step)
    _checks.check_out(out, x, x)
    impl = _backend.select("pointcloud_step", backend, **_backend.facts(x))
    if x.shape[0] == 0:
        return _into(out, _autograd.pointcloud_step(lambda xx: xx.new_empty(xx.shape), x, data, alpha, sigma, A, B,
                                                    log_weights, bandwidth))
    # an out sharing memory with the data (x a view of data) gets the result copied in: a kernel writing its rows
    # of out while other row blocks still read data would read overwritten points
    direct = out if out is not None and out.is_contiguous() and not _shares_memory(out, data, log_weights) else None

    def run(xx):
        return _precision.pointcloud_step(impl, backend, xx.contiguous(), data.contiguous(), alpha, sigma, A, B, C,
                                          seed, step, sample_offset, log_weights, bandwidth, direct, absmax=absmax)
    return _into(out, _autograd.pointcloud_step(run, x, data, alpha, sigma, A, B, log_weights, bandwidth))


def pointcloud_sample(x, data, table, seed: int, sample_offset: int = 0, log_weights=None, bandwidth: float = 0.0,
                      return_trajectory: bool = False, *, backend: str = "auto"):
    """Every step of a kernel step table for a point cloud; x is updated in place.

    table: [K, 17] numbers, one row per step with the columns of fastdiff._table (t, alpha, sigma, A, B0, B1, B2,
    C, then the churn and stage columns P, Cchurn, alphaU, sigmaU, Ux, UD, Uz, BU, rho; fd.step_table(...)
    .kernel_table(process) and fastdiff.methods.method_table(...).kernel_table(process) build it,
    fastdiff._table.pack from columns): x ← A x + B0 D_k + B1 D_{k−1} + B2 D_{k−2} + C z_k for a one-step row;
    a churned or two-stage row as fastdiff._table's docstring writes it, on every backend.
    Returns the trajectory [K+1, M, d] when asked, else None. x may have any strides. No backward: x must not
    require grad while grad mode is on."""
    if torch.compiler.is_compiling():
        return _library.pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth,
                                          return_trajectory, backend=backend)
    if _autograd.grad_needed(x, data, log_weights):
        raise ValueError("pointcloud_sample has no backward (x is updated in place through every step): call it "
                         "under torch.no_grad(), or loop over pointcloud_step for gradients")
    table = _checks.check_kernel_table(table)
    _, _, bandwidth, absmax = _check_cloud_call(x, data, 1.0, 1.0, log_weights, bandwidth)
    seed, sample_offset, _ = _checks.check_counters(seed, sample_offset, x.shape[0], steps=len(table))
    impl = _backend.select("pointcloud_sample", backend, **_backend.facts(x, table=table))
    # The backends write x as they go (the torch reference step by step): run on a contiguous copy and copy the
    # result back only when every step has succeeded, so an error leaves the caller's x as it was.
    work = x.detach().clone(memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        traj = x.new_empty((len(table) + 1, *x.shape)) if return_trajectory else None
    else:
        traj = _precision.pointcloud_sample(impl, backend, work, data.contiguous(), table, seed, sample_offset,
                                            log_weights, bandwidth, bool(return_trajectory), absmax=absmax)
    with torch.no_grad():
        x.copy_(work)
    return traj
