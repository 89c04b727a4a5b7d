"""Small input checks shared by the public API: every message names the offending argument."""
from __future__ import annotations

import decimal
import math
import numbers
import operator

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)

# Noise-counter limits (the counter (quad, step, sample lo, sample hi) of the noise contract). Global sample
# indices, and the end sample_offset + M of a range of them, are held in int64 by the torch reference and by
# every index tensor, so every backend enforces sample_offset + M < 2**63 (a documented limit below the
# counter's 2**64); steps use the 32-bit step word.
MAX_SAMPLES = 2**63
MAX_STEPS = 2**32
MAX_SEED = 2**64


def dtype_slack(v) -> float:
    """How far past an end of its range a value may lie and still count as that end: four of its own dtype's
    epsilons for a narrower float tensor or array (float32(0.3) = 0.30000001, a float32 σ(T) rounded outward),
    1e-12 otherwise."""
    dt = getattr(v, "dtype", None)
    if isinstance(dt, torch.dtype) and dt in (torch.float32, torch.float16, torch.bfloat16):
        return 4 * torch.finfo(dt).eps
    if isinstance(dt, np.dtype) and dt.kind == "f" and dt.itemsize < 8:
        return 4 * float(np.finfo(dt).eps)
    return 1e-12


def as_time(t, name: str = "t", T: float | None = None, allow_zero: bool = False):
    """Return `t` as a Python float or a float64 tensor, checked to lie in (0, T] (or [0, T]).

    A tensor in a narrower dtype than float64 may hold T rounded up (float32(0.3) = 0.30000001): up to a few of
    its own ulps above T are accepted and clamped to T, so torch.full((M,), T) works in the default dtype."""
    if isinstance(t, torch.Tensor):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D per-row tensor, got shape {tuple(t.shape)}")
        t64 = t.to(torch.float64)
        if not bool(torch.isfinite(t64).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if t64.numel():
            slack = dtype_slack(t)
            _check_range(float(t64.min()), name, T, allow_zero, slack)
            high = float(t64.max())
            _check_range(high, name, T, allow_zero, slack)
            if T is not None and high > T:
                t64 = t64.clamp_max(T)
        return t64
    tf = t if type(t) is float else as_real(t, name)      # a string or a bool is not a time
    if not math.isfinite(tf):
        raise ValueError(f"{name} must be finite, got {tf}")
    _check_range(tf, name, T, allow_zero)
    return tf


def _check_range(v: float, name: str, T: float | None, allow_zero: bool, slack: float = 1e-12):
    low_ok = v >= 0 if allow_zero else v > 0
    # Allow a hair of rounding above T: grids computed in float64 may land on T(1 + 1e-15).
    high_ok = T is None or v <= T * (1 + slack)
    if not (low_ok and high_ok):
        interval = f"[0, {T}]" if allow_zero else f"(0, {T}]"
        raise ValueError(f"{name} must lie in {interval}, got {v}")


def check_points(x, name: str = "x", dim: int | None = None) -> torch.Tensor:
    """A finite float32/float64 tensor of shape [M, d] (d == dim when given)."""
    check_points_shape(x, name)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the data dimension), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_cloud(x, data, log_weights=None):
    """Queries x [M, d] (finite float32/float64) against a point cloud data [N, d], N >= 1, on one device."""
    check_points(x, "x")
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or not data.is_floating_point():
        raise ValueError(f"data must be a floating tensor of shape [N, d], got {getattr(data, 'shape', type(data))}")
    if data.shape[0] == 0:
        raise ValueError("data must contain at least one point")
    if data.shape[1] != x.shape[1]:
        raise ValueError(f"x has d={x.shape[1]} columns but data has d={data.shape[1]}")
    check_same_device(x=x, data=data, log_weights=log_weights)


def per_row64(value, name: str, M: int, device) -> torch.Tensor:
    """A scalar or [M] value (alpha, sigma, a coefficient) as a finite float64 tensor of shape [1] or [M]."""
    v = torch.as_tensor(value, dtype=torch.float64, device=device) if not isinstance(value, torch.Tensor) \
        else value.to(device=device, dtype=torch.float64)
    if v.ndim == 0:
        v = v.reshape(1)
    if v.ndim != 1 or v.numel() not in (1, M):
        raise ValueError(f"{name} must be a scalar or have shape [M]=[{M}], got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return v


def check_same_device(**tensors):
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


# ---------------------------------------------------------------- the ops layer's checks (fastdiff.ops)
# Every op validates here, once, before any backend runs or anything is written, so each backend gets the same
# answer to a bad input and the caller's tensors are untouched when an op raises.

def check_int(value, name: str, low: int, high: int) -> int:
    """An integer-like value (int, numpy integer, integer 0-d tensor; not bool or float) in [low, high)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if not low <= v < high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}), got {v}")
    return v


def check_counters(seed, sample_offset, M: int, step=None, steps: int = 0):
    """(seed, sample_offset, step) as ints within the noise counter's limits, for M rows and, when a whole
    table runs, steps 0..steps-1. Raises ValueError/TypeError naming the argument."""
    seed = check_int(seed, "seed", 0, MAX_SEED)
    sample_offset = check_int(sample_offset, "sample_offset", 0, MAX_SAMPLES)
    if sample_offset + M >= MAX_SAMPLES:
        raise ValueError(f"sample_offset + M must be < 2**63 (global sample indices are int64), got "
                         f"sample_offset={sample_offset} with M={M} rows")
    if step is not None:
        step = check_int(step, "step", 0, MAX_STEPS)
    if steps > MAX_STEPS:
        raise ValueError(f"a table has at most 2**32 steps (the counter's step word), got {steps}")
    return seed, sample_offset, step


def check_number(value, name: str) -> float:
    """A finite real number (Python/numpy scalar or a one-element tensor); a bool or a string raises TypeError."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but gradients flow to x (and D) only")
    v = as_real(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def as_real(value, name: str) -> float:
    """A real number (int, float, Fraction, Decimal, numpy scalar, one-element array or tensor) as a float; a
    bool, a string or anything else raises TypeError naming `name` (float("1") would take a string)."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    elif isinstance(value, np.ndarray):
        ok = value.size == 1 and value.dtype.kind in "iuf"
    else:
        ok = isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, (bool, np.bool_))
    if not ok:
        kind = "a tensor" if isinstance(value, torch.Tensor) else "an array"
        shown = f"{kind} of shape {tuple(value.shape)} ({value.dtype})" \
            if isinstance(value, (torch.Tensor, np.ndarray)) else repr(value)
        raise TypeError(f"{name} must be a number, got {shown}")
    try:
        return float(value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None


def check_flag(value, name: str) -> bool:
    """True or False (numpy's too): a switch given as "False" or None would otherwise act by its truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_bandwidth(bandwidth) -> float:
    v = check_number(bandwidth, "bandwidth")
    if v < 0:
        raise ValueError(f"bandwidth must be >= 0 (a variance), got {v}")
    return v


def _plain_float(v):
    """A Python int or float as a float, else None (the tensor path handles everything else the same way)."""
    if type(v) not in (int, float):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def check_times(alpha, sigma, M: int, device):
    """alpha (finite) and sigma (finite, > 0), each a scalar or per-row [M], as float64 tensors [1] or [M]."""
    a, s = _plain_float(alpha), _plain_float(sigma)
    if a is not None and s is not None:   # the common call, in Python floats: ~10 tensor ops fewer per call
        if not math.isfinite(a):
            raise ValueError("alpha contains NaN or inf")
        if not (s > 0 and math.isfinite(s)):
            raise ValueError("sigma must be finite and positive (D is never evaluated at t = 0)")
        return torch.tensor([a], dtype=torch.float64), torch.tensor([s], dtype=torch.float64)
    for name, v in (("alpha", alpha), ("sigma", sigma)):
        if not isinstance(v, (torch.Tensor, np.ndarray, list, tuple)):
            as_real(v, name)                                  # a string or a bool is not a coefficient
        if isinstance(v, torch.Tensor) and v.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but gradients flow to x only")
    a = per_row64(alpha, "alpha", M, "cpu" if not isinstance(alpha, torch.Tensor) else device)
    s = torch.as_tensor(sigma.detach() if isinstance(sigma, torch.Tensor) else sigma, dtype=torch.float64)
    if s.ndim > 1 or s.numel() not in (1, M):
        raise ValueError(f"sigma must be a scalar or have shape [M]=[{M}], got {tuple(s.shape)}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):   # NaN fails s > 0
        raise ValueError("sigma must be finite and positive (D is never evaluated at t = 0)")
    return a, s.reshape(-1)


def check_kernel_table(table) -> torch.Tensor:
    """The kernel step table of pointcloud_sample (fastdiff._table): [K >= 1, WIDTH] finite numbers with sigma > 0
    (and sigmaU > 0 on two-stage rows, |rho| <= 1), returned as a float64 contiguous CPU tensor (the layout every
    backend takes as it is)."""
    from . import _table
    if isinstance(table, torch.Tensor) and table.requires_grad and torch.is_grad_enabled():
        raise ValueError("table requires grad, but pointcloud_sample has no backward")
    try:
        t = torch.as_tensor(table.detach() if isinstance(table, torch.Tensor) else table, dtype=torch.float64,
                            device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"table must be a [K, {_table.WIDTH}] tensor of numbers, got {type(table).__name__}") from None
    if t.ndim != 2 or t.shape[1] != _table.WIDTH or t.shape[0] == 0:
        raise ValueError(f"table must have shape [K >= 1, {_table.WIDTH}] (columns {', '.join(_table.COLUMNS)}; "
                         f"fastdiff.StepTable.kernel_table builds it), got {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        k, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"table column {_table.COLUMNS[j]} contains NaN or inf (at step {k})")
    sigma = t[:, _table.SIGMA]
    if not bool((sigma > 0).all()):
        raise ValueError("table column sigma must be positive at every step (D is never evaluated at t = 0)")
    staged = t[:, _table.BU] != 0
    if not bool((t[staged, _table.SIGMA_U] > 0).all()):
        k = int((staged & ~(t[:, _table.SIGMA_U] > 0)).nonzero()[0])
        raise ValueError(f"table row {k} has a stage (BU != 0), so its column sigmaU must be positive (D_u is never "
                         f"evaluated at t = 0), got {float(t[k, _table.SIGMA_U])}")
    if not bool((t[:, _table.RHO].abs() <= 1).all()):
        k = int((t[:, _table.RHO].abs() > 1).nonzero()[0])
        raise ValueError(f"table column rho is a correlation, |rho| <= 1, got {float(t[k, _table.RHO])} at step {k}")
    early = [k for k, col in ((0, _table.B1), (0, _table.B2), (1, _table.B2)) if k < t.shape[0] and t[k, col] != 0]
    if early:   # there is no D_{-1} or D_{-2} (csrc/common/table.h first_row_before_history)
        raise ValueError(f"table row {early[0]} uses a D from before the first step: B1 must be 0 at row 0 and B2 "
                         "at rows 0 and 1")
    return t.contiguous()


def minmax(**tensors):
    """{name: (min, max) as floats, or None for an empty tensor}: one reduction per tensor (NaN propagates to both
    ends) and one host transfer for all of them. Contiguous float32/float64 CPU tensors are scanned by the compiled
    extension in one call (fastdiff._C.value_ends, read-bandwidth bound); the rest by torch.aminmax."""
    names = [k for k, t in tensors.items() if t is not None and t.numel()]
    if not names:
        return {k: None for k in tensors}
    picked = [tensors[k].detach() for k in names]
    ext = _value_scanner() if all(_scannable(t) for t in picked) else None
    if ext is not None:
        values = ext.value_ends(picked)
    else:   # tensors share a device (checked before): stack there, then one transfer
        values = torch.stack([torch.stack(torch.aminmax(t)).to(torch.float64) for t in picked]).tolist()
    found = dict(zip(names, values, strict=True))
    return {k: (tuple(found[k]) if k in found else None) for k in tensors}


def _scannable(t) -> bool:
    return t.device.type == "cpu" and t.dtype in FLOAT_DTYPES and t.is_contiguous()


def _value_scanner():
    """fastdiff._C when it loads (the scan is the same numbers either way), else None."""
    from . import _backend
    try:
        return _backend.extension()
    except RuntimeError:
        return None


def data_ends(data):
    """minmax of a data tensor (one scan). Not remembered between calls: a tensor can change without torch's
    version counter seeing it (through .data or a NumPy view), and a stale NaN check would be silently wrong."""
    return minmax(data=data)["data"]


def _finite_ends(ends) -> bool:
    return ends is None or (math.isfinite(ends[0]) and math.isfinite(ends[1]))


def check_floating(t, name: str, shape=None, device=None) -> torch.Tensor:
    """A floating tensor (any float storage dtype), of `shape` and on `device` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return t


class Checked:
    """What the checks learned about the inputs, for callers that need it (e.g. max|x|, max|y| for the
    float32/float64 decision): floats, or None when a tensor was not given or is empty."""

    def __init__(self, ends):
        self.ends = ends

    def absmax(self, name: str):
        e = self.ends.get(name)
        return None if e is None else max(abs(e[0]), abs(e[1]))


def check_values(x=None, data=None, log_weights=None, D=None) -> Checked:
    """The value checks of the ops (NaN/inf in x, data, D; NaN, +inf or all -inf log_weights): one scan each, all in
    one call (minmax)."""
    ends = minmax(x=x, data=data, log_weights=log_weights, D=D)
    for name in ("x", "data", "D"):
        if not _finite_ends(ends[name]):
            raise ValueError(f"{name} contains NaN or inf")
    lw = ends["log_weights"]
    if lw is not None:
        lo, hi = lw
        if math.isnan(lo) or math.isnan(hi) or hi == math.inf:
            raise ValueError("log_weights contains NaN or +inf")
        if hi == -math.inf:
            raise ValueError("log_weights gives every data point zero weight (all -inf)")
    return Checked(ends)


def check_cloud_args(x, data, log_weights):
    """Shapes, dtypes and devices of a point-cloud op's tensors (values are checked by check_values)."""
    check_points_shape(x, "x")
    check_floating(data, "data")
    if data.ndim != 2:
        raise ValueError(f"data must have shape [N, d], got {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise ValueError("data must contain at least one point")
    if data.shape[1] != x.shape[1]:
        raise ValueError(f"x has d={x.shape[1]} columns but data has d={data.shape[1]}")
    check_same_device(x=x, data=data, log_weights=log_weights)
    if log_weights is not None:
        check_floating(log_weights, "log_weights", (data.shape[0],))
    for name, t in (("data", data), ("log_weights", log_weights)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but gradients flow to x only (detach it, or compute the "
                             "gradient with respect to the data yourself from the torch reference)")


def check_points_shape(x, name: str = "x") -> torch.Tensor:
    """check_points without the value scan (done by check_values together with the other tensors)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [M, d], got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (d >= 1), got shape {tuple(x.shape)}")
    return x


def check_out(out, x, *requires):
    """out= must match x (shape, dtype, device), and cannot be combined with autograd."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, *requires)):
        raise ValueError("out= cannot be used while x, D or out requires grad: autograd needs a new output tensor "
                         "(and writing into a tensor that requires grad breaks its graph); drop out=, or run under "
                         "torch.no_grad()")
    return out


def make_folder(path, name: str):
    """An output folder, created now (as the run would create it), so a file in the way or a folder that cannot
    be made is one ValueError naming `name` before the work, not an OSError after it."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name} {str(path)!r} cannot be created ({exc.strerror or exc})") from None
