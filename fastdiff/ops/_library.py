"""fastdiff.ops as torch.library custom ops (torch.ops.fastdiff.*), so that torch.compile(fullgraph=True) traces a
user loop that calls fastdiff.ops without a graph break.

Under torch.compile the public functions (fastdiff.ops.*) route here; in eager mode they run as before and never
touch these ops. Each op's implementation *is* the eager public function, so the compiled graph computes the same
bits and keeps its contract: the checks that read values (NaN/inf scans, table checks, the float32/float64
decision) run inside the op at run time, where the tensors are real, and an error leaves the caller's tensors as
they were. What tracing can decide from metadata alone (shapes, dtypes, devices, requires_grad, the range of the
noise counters) is checked by the wrappers below and by the fake implementations, at trace time.

Arguments cross the op boundary so that a loop over steps does not recompile per step:
- alpha, sigma, A, B, C, bandwidth: a Python number becomes a float64 0-d CPU tensor (exactly), and the op turns a
  float64 0-d CPU tensor back into the same Python float before calling the eager function. A `float` schema
  argument would make dynamo guard on its value (one graph per step); a tensor does not.
- seed, step, sample_offset: SymInt (dynamo makes them dynamic after the first change: one recompile, then none).
  The seed (< 2**64) travels as its int64 bit pattern; the op converts it back.
Autograd: the backward is fastdiff.ops._autograd's, in float64 from the inputs (posterior_vjp runs as its own op,
so the compiled backward does not trace its host-side block loop). First order only: the vjp op has no
autograd formula, so a double backward through a point-cloud op raises.
"""
from __future__ import annotations

import operator

import torch

from .. import _checks
from . import _autograd

Tensor = torch.Tensor
_F64 = torch.float64
_SEED_WRAP = 2**64


# ------------------------------------------------------------------ arguments across the op boundary
def _number_arg(value):
    """A Python number as a float64 0-d CPU tensor (exact); a tensor as it is; a sequence as a float64 tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)):
        # 1.0 * value is exact. Written as a product because dynamo turns a float argument that changes between
        # calls into a 0-d tensor input and keeps it symbolic through a product, while it specialises (one graph
        # per value) a float that reaches torch.scalar_tensor, torch.tensor or torch.full.
        return torch.ones((), dtype=_F64, device="cpu") * value
    return torch.as_tensor(value, dtype=_F64)


def _number_value(t):
    """The inverse of _number_arg inside the op: a float64 0-d CPU tensor is given back as the Python float."""
    if t is not None and t.ndim == 0 and t.dtype == _F64 and t.device.type == "cpu":
        return t.item()
    return t


def _counter_arg(value, name: str, high: int):
    """A noise counter for the op. An int is checked by comparisons only: while tracing, an int argument that
    changes between calls is symbolic (dynamo shows it as an int), and comparisons guard on its range, not on
    its value, so the loop does not recompile per step. Anything else (numpy integers, floats, bools) goes through
    the eager check, which raises TypeError or converts it."""
    if torch.compiler.is_compiling() and not isinstance(value, (int, float, torch.Tensor)):
        # traced, a numpy integer is a 0-d tensor (not an np.integer) whose value is unknown: its range is asserted
        # at run time, since comparing it would need its value
        v = operator.index(value)
        torch._check(v >= 0, lambda: f"{name} must be an integer in [0, {high})")
        torch._check(v < high, lambda: f"{name} must be an integer in [0, {high})")
        return v
    if type(value) is not int:
        return _checks.check_int(value, name, 0, high)
    if not 0 <= value < high:
        raise ValueError(f"{name} must be an integer in [0, {high})")
    return value


def _seed_arg(seed):
    # a traced numpy seed (int32, uint32, ...; dynamo itself fails on a uint64 one) is below 2**63, which is asserted
    # so that the comparison below is decided while tracing
    traced_numpy = torch.compiler.is_compiling() and not isinstance(seed, (int, float, torch.Tensor))
    seed = _counter_arg(seed, "seed", 2**63 if traced_numpy else _SEED_WRAP)
    return seed - _SEED_WRAP if isinstance(seed, int) and seed >= 2**63 else seed


def _refuse_grad(why: str, **named):
    """The eager functions' requires-grad refusals, decided from metadata at trace time."""
    if torch.is_grad_enabled():
        for name, t in named.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"{name} requires grad, but {why}")


# ------------------------------------------------------------------ the ops (their implementation: fastdiff.ops)
def _eager():
    from .. import ops
    return ops


@torch.library.custom_op("fastdiff::posterior", mutates_args=())
def posterior_op(x: Tensor, data: Tensor, alpha: Tensor, sigma: Tensor, log_weights: Tensor | None,
                 bandwidth: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """fastdiff.ops.posterior (numbers as float64 0-d CPU tensors)."""
    return _eager().posterior(x, data, _number_value(alpha), _number_value(sigma), log_weights,
                              _number_value(bandwidth), backend=backend)


@posterior_op.register_fake
def _(x, data, alpha, sigma, log_weights, bandwidth, backend):
    _checks.check_cloud_args(x, data, log_weights)
    return x.new_empty(x.shape), x.new_empty(x.shape[0])


@torch.library.custom_op("fastdiff::posterior_vjp", mutates_args=())
def posterior_vjp_op(x: Tensor, data: Tensor, alpha: Tensor, sigma: Tensor, log_weights: Tensor | None,
                     bandwidth: Tensor, gD: Tensor | None, gL: Tensor | None) -> Tensor:
    """x̄ of the point-cloud posterior in float64 (fastdiff.ops._autograd.posterior_vjp); no autograd formula."""
    return _autograd.posterior_vjp(x, data, _number_value(alpha), _number_value(sigma), log_weights,
                                   _number_value(bandwidth), gD, gL)


@posterior_vjp_op.register_fake
def _(x, data, alpha, sigma, log_weights, bandwidth, gD, gL):
    return x.new_empty(x.shape, dtype=_F64)


@torch.library.custom_op("fastdiff::affine_step", mutates_args=())
def affine_step_op(x: Tensor, D: Tensor, A: Tensor, B: Tensor, C: Tensor, seed: int, step: int, sample_offset: int,
                   D1: Tensor | None, B1: Tensor, D2: Tensor | None, B2: Tensor, backend: str) -> Tensor:
    """fastdiff.ops.affine_step into a new tensor (seed as its int64 bit pattern; the history as D1/B1, D2/B2,
    D_j None when unused)."""
    return _eager().affine_step(x, D, *map(_number_value, (A, B, C)), seed % _SEED_WRAP, step, sample_offset,
                                history=_history_value(D1, B1, D2, B2), backend=backend)


@affine_step_op.register_fake
def _(x, D, A, B, C, seed, step, sample_offset, D1, B1, D2, B2, backend):
    _check_affine_shapes(x, D, D1, D2)
    return x.new_empty(x.shape)


@torch.library.custom_op("fastdiff::affine_step_out", mutates_args=("out",))
def affine_step_out_op(x: Tensor, D: Tensor, A: Tensor, B: Tensor, C: Tensor, seed: int, step: int,
                       sample_offset: int, D1: Tensor | None, B1: Tensor, D2: Tensor | None, B2: Tensor,
                       backend: str, out: Tensor) -> None:
    """fastdiff.ops.affine_step(..., out=out); out may be x."""
    _eager().affine_step(x, D, *map(_number_value, (A, B, C)), seed % _SEED_WRAP, step, sample_offset, out=out,
                         history=_history_value(D1, B1, D2, B2), backend=backend)


@affine_step_out_op.register_fake
def _(x, D, A, B, C, seed, step, sample_offset, D1, B1, D2, B2, backend, out):
    _check_affine_shapes(x, D, D1, D2)
    _checks.check_out(out, x)


def _check_affine_shapes(x, D, D1=None, D2=None):
    _checks.check_points_shape(x, "x")
    _checks.check_floating(D, "D", x.shape)
    _checks.check_same_device(x=x, D=D)
    _eager().check_history(tuple((0.0, Dj) for Dj in (D1, D2) if Dj is not None), x)


def _history_arg(history, x):
    """affine_step's history for the op: (D1, B1, D2, B2), D_j None and B_j 0 where unused (structure checked)."""
    pairs = _eager().check_history(history, x)
    _refuse_grad("gradients flow to x and the D's only", **{f"history[{j}] B": Bj for j, (Bj, _) in enumerate(pairs)})
    pairs = pairs + [(0.0, None)] * (2 - len(pairs))
    return pairs[0][1], _number_arg(pairs[0][0]), pairs[1][1], _number_arg(pairs[1][0])


def _history_value(D1, B1, D2, B2):
    """The inverse of _history_arg inside the op: the (B_j, D_j) pairs that were given."""
    return tuple((_number_value(Bj), Dj) for Dj, Bj in ((D1, B1), (D2, B2)) if Dj is not None)


@torch.library.custom_op("fastdiff::pointcloud_step", mutates_args=())
def pointcloud_step_op(x: Tensor, data: Tensor, alpha: Tensor, sigma: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       seed: int, step: int, sample_offset: int, log_weights: Tensor | None, bandwidth: Tensor,
                       backend: str) -> Tensor:
    """fastdiff.ops.pointcloud_step into a new tensor."""
    return _eager().pointcloud_step(x, data, *map(_number_value, (alpha, sigma, A, B, C)), seed % _SEED_WRAP, step,
                                    sample_offset, log_weights, _number_value(bandwidth), backend=backend)


@pointcloud_step_op.register_fake
def _(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, backend):
    _checks.check_cloud_args(x, data, log_weights)
    return x.new_empty(x.shape)


@torch.library.custom_op("fastdiff::pointcloud_step_out", mutates_args=("out",))
def pointcloud_step_out_op(x: Tensor, data: Tensor, alpha: Tensor, sigma: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           seed: int, step: int, sample_offset: int, log_weights: Tensor | None,
                           bandwidth: Tensor, backend: str, out: Tensor) -> None:
    """fastdiff.ops.pointcloud_step(..., out=out); out may be x."""
    _eager().pointcloud_step(x, data, *map(_number_value, (alpha, sigma, A, B, C)), seed % _SEED_WRAP, step,
                             sample_offset, log_weights, _number_value(bandwidth), out=out, backend=backend)


@pointcloud_step_out_op.register_fake
def _(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, backend, out):
    _checks.check_cloud_args(x, data, log_weights)
    _checks.check_out(out, x)


@torch.library.custom_op("fastdiff::pointcloud_sample", mutates_args=("x",))
def pointcloud_sample_op(x: Tensor, data: Tensor, table: Tensor, seed: int, sample_offset: int,
                         log_weights: Tensor | None, bandwidth: Tensor, return_trajectory: bool,
                         backend: str) -> Tensor:
    """fastdiff.ops.pointcloud_sample (x updated in place); the trajectory, or an empty tensor when not asked
    (an op returns a tensor)."""
    traj = _eager().pointcloud_sample(x, data, table, seed % _SEED_WRAP, sample_offset, log_weights,
                                      _number_value(bandwidth), return_trajectory, backend=backend)
    return traj if traj is not None else x.new_empty(0)


@pointcloud_sample_op.register_fake
def _(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory, backend):
    _checks.check_cloud_args(x, data, log_weights)
    return x.new_empty((table.shape[0] + 1, *x.shape)) if return_trajectory else x.new_empty(0)


# ------------------------------------------------------------------ autograd (fastdiff.ops._autograd's rules)
def _save_cloud(ctx, x, data, alpha, sigma, log_weights, bandwidth):
    ctx.save_for_backward(x, data, alpha, sigma, log_weights, bandwidth)


def _posterior_setup(ctx, inputs, output):
    _save_cloud(ctx, *inputs[:6])


def _posterior_backward(ctx, gD, gL):
    x, *cloud = ctx.saved_tensors
    gx = torch.ops.fastdiff.posterior_vjp(x, *cloud, gD, gL)
    return gx.to(x.dtype), None, None, None, None, None, None


def _affine_setup(ctx, inputs, output):
    x, D, A, B, _C, _seed, _step, _offset, D1, B1, D2, B2 = inputs[:12]
    ctx.save_for_backward(A, B, B1, B2)
    ctx.dtypes = (D.dtype, None if D1 is None else D1.dtype, None if D2 is None else D2.dtype)


def _affine_backward(ctx, g):
    A, B, B1, B2 = ctx.saved_tensors
    # as _autograd._AffineStep: the products in float64 (a float64 0-d tensor times g64 rounds as the Python float)
    g64 = g.to(_F64)
    need = ctx.needs_input_grad
    gx = (g64 * A).to(g.dtype) if need[0] else None
    gD = (g64 * B).to(ctx.dtypes[0]) if need[1] else None
    gD1 = (g64 * B1).to(ctx.dtypes[1]) if need[8] else None
    gD2 = (g64 * B2).to(ctx.dtypes[2]) if need[10] else None
    return gx, gD, None, None, None, None, None, None, gD1, None, gD2, None, None


def _pointcloud_step_setup(ctx, inputs, output):
    x, data, alpha, sigma, A, B, _C, _seed, _step, _offset, log_weights, bandwidth, _backend = inputs
    ctx.save_for_backward(x, data, alpha, sigma, log_weights, bandwidth, A, B)


def _pointcloud_step_backward(ctx, g):
    x, data, alpha, sigma, log_weights, bandwidth, A, B = ctx.saved_tensors
    g64 = g.to(_F64)
    gx = A * g64 + torch.ops.fastdiff.posterior_vjp(x, data, alpha, sigma, log_weights, bandwidth, B * g64, None)
    return (gx.to(x.dtype),) + (None,) * 12


posterior_op.register_autograd(_posterior_backward, setup_context=_posterior_setup)
affine_step_op.register_autograd(_affine_backward, setup_context=_affine_setup)
pointcloud_step_op.register_autograd(_pointcloud_step_backward, setup_context=_pointcloud_step_setup)


# ------------------------------------------------------------------ what fastdiff.ops calls while compiling
_GRAD_X_ONLY = "gradients flow to x only"


def posterior(x, data, alpha, sigma, log_weights=None, bandwidth=0.0, *, backend="auto"):
    _checks.check_cloud_args(x, data, log_weights)
    _refuse_grad(_GRAD_X_ONLY, alpha=alpha, sigma=sigma, bandwidth=bandwidth)
    return torch.ops.fastdiff.posterior(x, data, _number_arg(alpha), _number_arg(sigma), log_weights,
                                        _number_arg(bandwidth), backend)


def affine_step(x, D, A, B, C, seed, step, sample_offset=0, *, out=None, history=(), backend="auto"):
    _check_affine_shapes(x, D)
    _checks.check_same_device(x=x, D=D, out=out)
    _refuse_grad("gradients flow to x (and D) only", A=A, B=B, C=C)
    D1, B1, D2, B2 = _history_arg(history, x)
    _checks.check_out(out, x, x, D, D1, D2)
    args = (x, D, *map(_number_arg, (A, B, C)), _seed_arg(seed), _counter_arg(step, "step", _checks.MAX_STEPS),
            _counter_arg(sample_offset, "sample_offset", _checks.MAX_SAMPLES), D1, B1, D2, B2, backend)
    if out is None:
        return torch.ops.fastdiff.affine_step(*args)
    torch.ops.fastdiff.affine_step_out(*args, out)
    return out


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None, bandwidth=0.0,
                    *, out=None, backend="auto"):
    _checks.check_cloud_args(x, data, log_weights)
    _refuse_grad(_GRAD_X_ONLY, alpha=alpha, sigma=sigma, A=A, B=B, C=C, bandwidth=bandwidth)
    _checks.check_out(out, x, x)
    args = (x, data, *map(_number_arg, (alpha, sigma, A, B, C)), _seed_arg(seed),
            _counter_arg(step, "step", _checks.MAX_STEPS),
            _counter_arg(sample_offset, "sample_offset", _checks.MAX_SAMPLES), log_weights, _number_arg(bandwidth),
            backend)
    if out is None:
        return torch.ops.fastdiff.pointcloud_step(*args)
    torch.ops.fastdiff.pointcloud_step_out(*args, out)
    return out


def pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False, *, backend="auto"):
    if _autograd.grad_needed(x, data, log_weights):
        raise ValueError("pointcloud_sample has no backward (x is updated in place through every step): call it "
                         "under torch.no_grad(), or loop over pointcloud_step for gradients")
    _checks.check_cloud_args(x, data, log_weights)
    _refuse_grad("pointcloud_sample has no backward", table=table, bandwidth=bandwidth)
    traj = torch.ops.fastdiff.pointcloud_sample(x, data, torch.as_tensor(table, dtype=_F64), _seed_arg(seed),
                                                _counter_arg(sample_offset, "sample_offset", _checks.MAX_SAMPLES),
                                                log_weights, _number_arg(bandwidth), bool(return_trajectory),
                                                backend)
    return traj if return_trajectory else None
