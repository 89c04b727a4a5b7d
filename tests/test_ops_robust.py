"""fastdiff.ops on awkward inputs, on every backend this machine has (issue 12, items 1, 2, 4-7):
empty shapes, autograd, validation in one place, all-or-nothing on error, noise-counter limits, any strides.

Every op either returns the right answer (checked against the float64 torch reference, or against the same
backend on contiguous inputs, bit for bit) or raises ValueError/TypeError naming the argument, and then leaves
the caller's tensors untouched."""
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiff as fd
from fastdiff import _backend, _checks, _table, ops

F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")


def _backend_params():
    out = []
    for name in ("cpu", "torch", "triton"):
        reasons = _backend.BACKENDS[name].unavailable_reasons()
        if name == "triton" and not reasons:
            from fastdiff.triton import _common
            if not (torch.cuda.is_available() or _common.interpreting()):
                reasons = ["no CUDA device and TRITON_INTERPRET is not 1"]
        marks = (pytest.mark.skip(reason="; ".join(reasons)),) if reasons else ()
        out.append(pytest.param(name, id=name, marks=marks))
    return out


BACKENDS = _backend_params()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend):
    return "cpu" if backend == "cpu" else DEV


def _dtype(backend):
    """float64 where the backend has it (the triton kernels compute in float32)."""
    return F32 if backend == "triton" else F64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(M=5, N=7, d=3, seed=0, dtype=F64, device="cpu"):
    y = torch.randn(N, d, generator=_gen(seed), dtype=F64)
    x = y[torch.arange(M) % N] + 0.4 * torch.randn(M, d, generator=_gen(seed + 1), dtype=F64)
    return x.to(device, dtype), y.to(device, dtype)


# ------------------------------------------------------------------ item 1: d = 0 and M = 0
def test_compiled_affine_step_with_no_columns_raises_instead_of_sigfpe():
    """The kernel used to divide by the quad count (0): the process died with SIGFPE. Run it in a child."""
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    code = ("import torch\nfrom fastdiff import _backend\nC = _backend.extension()\n"
            "try:\n    C.affine_step(torch.randn(4, 0), torch.randn(4, 0), 1., 1., 1., 0, 0)\n"
            "except (RuntimeError, ValueError) as e:\n    print('raised:', type(e).__name__, e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "raised: ValueError x must have at least one column" in res.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["posterior", "affine_step", "pointcloud_step", "pointcloud_sample"])
def test_no_columns_is_a_clear_error(backend, op):
    dev, dt = _device(backend), _dtype(backend)
    x, y = torch.randn(4, 0, dtype=dt, device=dev), torch.randn(3, 0, dtype=dt, device=dev)
    with pytest.raises(ValueError, match="x must have at least one column"):
        _call(op, backend, x, y)


def _call(op, backend, x, y, **kw):
    if op == "posterior":
        return ops.posterior(x, y, 0.8, 0.5, backend=backend, **kw)
    if op == "affine_step":
        return ops.affine_step(x, y[: x.shape[0]] if y.shape[0] >= x.shape[0] else torch.zeros_like(x),
                               0.9, 0.1, 0.3, 1, 2, backend=backend, **kw)
    if op == "pointcloud_step":
        return ops.pointcloud_step(x, y, 0.8, 0.5, 0.9, 0.1, 0.3, 1, 2, backend=backend, **kw)
    return ops.pointcloud_sample(x, y, _table.pack([0.8, 0.9], [0.5, 0.3], [0.9, 0.9], [0.1, 0.1], [0.3, 0.2]), 1,
                                 backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_is_a_no_op(backend):
    dev, dt = _device(backend), _dtype(backend)
    x, y = torch.empty(0, 3, dtype=dt, device=dev), torch.randn(4, 3, dtype=dt, device=dev)
    D, L = ops.posterior(x, y, 0.8, 0.5, backend=backend)
    assert D.shape == (0, 3) and L.shape == (0,) and D.dtype == dt and L.dtype == dt
    assert ops.affine_step(x, x, 0.9, 0.1, 0.3, 1, 2, backend=backend).shape == (0, 3)
    assert ops.affine_step(x, x, 0.9, 0.1, 0.3, 1, 2, out=x, backend=backend) is x
    assert ops.pointcloud_step(x, y, 0.8, 0.5, 0.9, 0.1, 0.3, 1, 2, backend=backend).shape == (0, 3)
    traj = ops.pointcloud_sample(x, y, _table.pack([0.8], [0.5], [0.9], [0.1], [0.3]), 1, return_trajectory=True,
                                 backend=backend)
    assert traj.shape == (2, 0, 3)


# ------------------------------------------------------------------ item 2: gradients
GRAD_BACKENDS = [p for p in BACKENDS if p.values[0] in ("cpu", "torch")]   # float64 kernels


def _posterior_grad_cases():
    # (per-row alpha/sigma?, log-weights?, bandwidth)
    return [(False, False, 0.0), (True, True, 0.0), (False, True, 0.3)]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("per_row, weighted, v", _posterior_grad_cases())
def test_posterior_gradcheck(backend, per_row, weighted, v):
    """dL/dx is the score (α ȳ − x)/c; dD/dx = (σ²α/c²)·Cov_w(y) + (αv/c)·I."""
    x, y = _problem(M=4, N=6, d=3)
    alpha = torch.tensor([0.7, 0.9, 1.0, 0.5], dtype=F64) if per_row else 0.8
    sigma = torch.tensor([0.6, 0.4, 1.1, 0.8], dtype=F64) if per_row else 0.7
    lw = torch.randn(6, generator=_gen(5), dtype=F64) if weighted else None
    if weighted:
        lw[2] = -INF                                        # a zero-weight point
    x.requires_grad_(True)
    f = lambda xx: ops.posterior(xx, y, alpha, sigma, lw, v, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradient_of_L_is_the_score(backend):
    x, y = _problem(M=6, N=9, d=2, seed=3)
    alpha, sigma = 0.6, 0.5
    x.requires_grad_(True)
    D, L = ops.posterior(x, y, alpha, sigma, backend=backend)
    (g,) = torch.autograd.grad(L.sum(), x)
    c = sigma**2
    assert torch.allclose(g, (alpha * D.detach() - x.detach()) / c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_affine_and_pointcloud_step_gradcheck(backend):
    x, y = _problem(M=4, N=5, d=5, seed=7)
    D = torch.randn(4, 5, generator=_gen(8), dtype=F64).requires_grad_(True)
    x.requires_grad_(True)
    step = lambda xx, DD: ops.affine_step(xx, DD, 0.9, -0.3, 0.2, 3, 4, 11, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(step, (x, D), eps=1e-6, atol=1e-7, rtol=1e-6)
    fused = lambda xx: ops.pointcloud_step(xx, y, 0.8, 0.6, 0.9, 0.4, 0.2, 3, 4, 11, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_agree_across_backends(backend):
    """The same gradient semantics on every backend (triton: float32 forward, the float64 backward)."""
    dt = _dtype(backend)
    x, y = _problem(M=5, N=8, d=3, seed=9, dtype=dt, device=_device(backend))
    xg = x.clone().requires_grad_(True)
    D, L = ops.posterior(xg, y, 0.9, 0.5, backend=backend)
    gD = torch.randn(5, 3, generator=_gen(1), dtype=F64).to(x.device, dt)
    g_back = torch.autograd.grad((D * gD).sum() + L.sum(), xg)[0]
    x64 = x.double().requires_grad_(True)
    D64, L64 = ops.posterior(x64, y.double(), 0.9, 0.5, backend="torch")
    g_ref = torch.autograd.grad((D64 * gD.double()).sum() + L64.sum(), x64)[0]
    tol = 1e-10 if dt == F64 else 1e-4
    assert torch.allclose(g_back.double(), g_ref, rtol=tol, atol=tol * float(g_ref.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_without_backward_refuse_inputs_that_require_grad(backend):
    dev, dt = _device(backend), _dtype(backend)
    x, y = _problem(dtype=dt, device=dev)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="pointcloud_sample has no backward"):
        _call("pointcloud_sample", backend, xg, y)
    assert torch.equal(xg.detach(), x)
    with pytest.raises(ValueError, match="data requires grad"):
        ops.posterior(x, y.clone().requires_grad_(True), 0.8, 0.5, backend=backend)
    with pytest.raises(ValueError, match="out= cannot be used"):
        ops.affine_step(xg, x, 0.9, 0.1, 0.3, 1, 2, out=xg, backend=backend)
    assert torch.equal(xg.detach(), x)
    with torch.no_grad():     # without grad mode nothing is recorded: the ops run as usual
        out = ops.pointcloud_step(xg, y, 0.8, 0.5, 0.9, 0.1, 0.3, 1, 2, backend=backend)
    assert out.grad_fn is None and not out.requires_grad


def test_every_sampler_call_goes_through_fastdiff_ops(monkeypatch):
    """One call path: fd.sample reaches a backend only from inside fastdiff.ops (which validates, handles autograd
    and precision), in the fused run, the step-by-step run and a model loop."""
    calls, depth = [], [0]

    def spy_op(name, real):
        def op(*args, **kwargs):
            calls.append(name)
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
        return op

    def spy_backend(self, op, real=_backend.TorchBackend._op):
        fn = real(self, op)

        def backend_op(*args):
            assert depth[0] > 0, f"backend {op} called outside fastdiff.ops"
            return fn(*args)
        return backend_op

    for name in _backend.OPS:
        monkeypatch.setattr(ops, name, spy_op(name, getattr(ops, name)))
    monkeypatch.setattr(_backend.TorchBackend, "_op", spy_backend)
    cloud = fd.PointCloud(torch.randn(20, 2, generator=torch.Generator().manual_seed(0)), fd.VP())
    fd.sample(cloud, n=4, steps=3, schedule="logsnr", backend="torch")
    assert calls == ["pointcloud_sample"]
    calls.clear()
    fd.sample(cloud, n=4, steps=3, backend="torch", callback=lambda info: None)
    assert calls == ["posterior", "affine_step"] * 3
    calls.clear()
    fd.sample(fd.from_model(lambda x, t: 0.5 * x, fd.VP(), event_shape=(2,)), n=4, steps=3, backend="torch")
    assert calls == ["affine_step"] * 3


# ------------------------------------------------------------------ items 4 and 5: validation, all-or-nothing
def _bad_cases():
    """(op, keyword overrides, argument the message must name)."""
    nan_tab = [0.9, NAN]
    inf_tab = [INF, 0.9]
    return [
        ("posterior", {"alpha": NAN}, "alpha"), ("posterior", {"alpha": INF}, "alpha"),
        ("posterior", {"alpha": "per-row-nan"}, "alpha"),
        ("posterior", {"sigma": NAN}, "sigma"), ("posterior", {"sigma": 0.0}, "sigma"),
        ("posterior", {"log_weights": "nan"}, "log_weights"), ("posterior", {"log_weights": "+inf"}, "log_weights"),
        ("posterior", {"log_weights": "all -inf"}, "log_weights"),
        ("posterior", {"data": "nan"}, "data"), ("posterior", {"data": "inf"}, "data"),
        ("posterior", {"bandwidth": INF}, "bandwidth"), ("posterior", {"bandwidth": NAN}, "bandwidth"),
        ("posterior", {"bandwidth": -0.1}, "bandwidth"),
        ("posterior", {"x": "nan"}, "x"),
        ("affine_step", {"A": NAN}, "A"), ("affine_step", {"B": INF}, "B"), ("affine_step", {"C": NAN}, "C"),
        ("affine_step", {"D": "nan"}, "D"), ("affine_step", {"D": "inf"}, "D"),
        ("pointcloud_step", {"A": INF}, "A"), ("pointcloud_step", {"C": NAN}, "C"),
        ("pointcloud_step", {"alpha": NAN}, "alpha"), ("pointcloud_step", {"data": "nan"}, "data"),
        ("pointcloud_step", {"log_weights": "all -inf"}, "log_weights"),
        ("pointcloud_step", {"bandwidth": INF}, "bandwidth"),
        ("pointcloud_sample", {"A": nan_tab}, "A"), ("pointcloud_sample", {"B": inf_tab}, "B0"),
        ("pointcloud_sample", {"C": nan_tab}, "C"), ("pointcloud_sample", {"alpha": nan_tab}, "alpha"),
        ("pointcloud_sample", {"alpha": inf_tab}, "alpha"), ("pointcloud_sample", {"sigma": nan_tab}, "sigma"),
        ("pointcloud_sample", {"data": "nan"}, "data"), ("pointcloud_sample", {"log_weights": "nan"}, "log_weights"),
        ("pointcloud_sample", {"bandwidth": -1.0}, "bandwidth"),
    ]


def _materialise(kw, x, y):
    """Turn the symbolic bad values of _bad_cases into tensors shaped like the problem."""
    out = dict(kw)
    if kw.get("alpha") == "per-row-nan":
        out["alpha"] = torch.tensor([0.5] * (x.shape[0] - 1) + [NAN], dtype=F64)
    lw = kw.get("log_weights")
    if isinstance(lw, str):
        t = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        if lw == "nan":
            t[1] = NAN
        elif lw == "+inf":
            t[1] = INF
        else:
            t[:] = -INF
        out["log_weights"] = t
    for name, src in (("data", y), ("D", x), ("x", x)):
        if isinstance(kw.get(name), str):
            t = src.clone()
            t[1, 0] = NAN if kw[name] == "nan" else INF
            out[name] = t
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, kw, name", _bad_cases(), ids=lambda v: str(v) if not isinstance(v, dict) else None)
def test_bad_value_is_named_and_leaves_x_untouched(backend, op, kw, name):
    dev, dt = _device(backend), _dtype(backend)
    x, y = _problem(M=4, N=6, d=3, dtype=dt, device=dev)
    kw = _materialise(kw, x, y)
    xin = kw.pop("x", x).clone()
    keep = xin.clone()
    args = {"posterior": dict(data=y, alpha=0.8, sigma=0.5, log_weights=None, bandwidth=0.0),
            "affine_step": dict(D=torch.randn_like(x), A=0.9, B=0.1, C=0.3, seed=1, step=2),
            "pointcloud_step": dict(data=y, alpha=0.8, sigma=0.5, A=0.9, B=0.1, C=0.3, seed=1, step=2,
                                    log_weights=None, bandwidth=0.0),
            "pointcloud_sample": dict(data=y, alpha=[0.8, 0.9], sigma=[0.5, 0.3], A=[0.9, 0.9], B=[0.1, 0.1],
                                      C=[0.3, 0.2], seed=1, log_weights=None, bandwidth=0.0)}[op]
    args.update(kw)
    if op == "pointcloud_sample":       # the columns go down as one kernel table (fastdiff._table)
        args["table"] = _table.pack(*(args.pop(k) for k in ("alpha", "sigma", "A", "B", "C")))
    if op in ("affine_step", "pointcloud_step"):
        args["out"] = xin                                   # in place: must stay untouched on error
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        getattr(ops, op)(xin, backend=backend, **args)
    if name != "x":
        assert not str(info.value).startswith("x "), str(info.value)
    assert torch.equal(xin, keep) or (name == "x" and torch.equal(xin.isnan(), keep.isnan()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_log_weights_on_some_points_are_zero_weights(backend):
    dev, dt = _device(backend), _dtype(backend)
    x, y = _problem(M=4, N=6, d=3, dtype=dt, device=dev)
    lw = torch.zeros(6, dtype=dt, device=dev)
    lw[[0, 3]] = -INF
    D, L = ops.posterior(x, y, 0.8, 0.5, lw, backend=backend)
    D0, L0 = ops.posterior(x.double(), y[[1, 2, 4, 5]].double(), 0.8, 0.5, backend="torch")
    tol = 1e-12 if dt == F64 else 1e-5
    assert torch.allclose(D.double(), D0, atol=tol) and torch.allclose(L.double(), L0, atol=tol)


# ------------------------------------------------------------------ item 6: noise counters
@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_indices_past_the_limit_are_refused(backend):
    """Global sample indices are int64 on every backend (the torch reference indexes with int64 tensors):
    sample_offset + M < 2**63. The cpu kernel used to wrap at 2**64 silently."""
    dev, dt = _device(backend), _dtype(backend)
    x = torch.zeros(8, 3, dtype=dt, device=dev)
    keep = x.clone()
    for offset in (2**63 - 8, 2**64 - 4):
        with pytest.raises(ValueError, match="sample_offset"):
            ops.affine_step(x, x, 0.0, 0.0, 1.0, 1, 2, offset, out=x, backend=backend)
        with pytest.raises(ValueError, match="sample_offset"):
            ops.pointcloud_sample(x, x[:2], _table.pack([0.8], [0.5], [0.9], [0.1], [0.3]), 1, offset,
                                  backend=backend)
    assert torch.equal(x, keep)
    last = ops.affine_step(x, x, 0.0, 0.0, 1.0, 1, 2, 2**63 - 9, backend=backend)   # the last 8 indices
    ref = fd.noise.normal(1, list(range(2**63 - 9, 2**63 - 1)), 2, 3, dtype=F64)
    ulps = 8 if backend == "triton" else 1          # triton: Box-Muller in float32 (README, noise contract)
    tol = ulps * torch.finfo(dt).eps * (ref.abs() + 1)
    assert bool(((last.double().cpu() - ref).abs() <= tol).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_arguments_must_be_integers_in_range(backend):
    dev, dt = _device(backend), _dtype(backend)
    x = torch.randn(3, 2, dtype=dt, device=dev)
    for kw, name in (({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"step": 2**32}, "step"),
                     ({"step": -1}, "step"), ({"sample_offset": -1}, "sample_offset")):
        with pytest.raises(ValueError, match=name):
            ops.affine_step(x, x, 1.0, 0.0, 1.0, **{"seed": 0, "step": 0, **kw}, backend=backend)
    for kw, name in (({"seed": 1.7}, "seed"), ({"step": 2.5}, "step"), ({"sample_offset": 1.5}, "sample_offset"),
                     ({"seed": True}, "seed")):
        with pytest.raises(TypeError, match=name):
            ops.affine_step(x, x, 1.0, 0.0, 1.0, **{"seed": 0, "step": 0, **kw}, backend=backend)
    import numpy as np
    a = ops.affine_step(x, x, 1.0, 0.0, 1.0, np.int64(3), np.uint32(4), np.int64(5), backend=backend)
    b = ops.affine_step(x, x, 1.0, 0.0, 1.0, 3, 4, 5, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, x)


# ------------------------------------------------------------------ item 7: any strides
def _strided(t):
    """The same values with a non-contiguous layout (column-major)."""
    s = t.T.contiguous().T
    assert not s.is_contiguous() and torch.equal(s, t)
    return s


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides_same_answer_and_in_place_updates(backend):
    dev, dt = _device(backend), _dtype(backend)
    x, y = _problem(M=6, N=5, d=3, seed=4, dtype=dt, device=dev)
    D = torch.randn(6, 3, generator=_gen(2), dtype=F64).to(dev, dt)
    Dp, Lp = ops.posterior(x, y, 0.8, 0.5, backend=backend)
    Ds, Ls = ops.posterior(_strided(x), _strided(y), 0.8, 0.5, backend=backend)
    assert torch.equal(Dp, Ds) and torch.equal(Lp, Ls)

    want = ops.affine_step(x, D, 0.9, 0.2, 0.3, 1, 2, 3, backend=backend)
    xs = _strided(x)
    assert ops.affine_step(xs, _strided(D), 0.9, 0.2, 0.3, 1, 2, 3, out=xs, backend=backend) is xs
    assert torch.equal(xs, want)
    xs[:, 0] += 0    # still the caller's view
    want = ops.pointcloud_step(x, y, 0.8, 0.5, 0.9, 0.2, 0.3, 1, 2, 3, backend=backend)
    xs = _strided(x)
    ops.pointcloud_step(xs, y, 0.8, 0.5, 0.9, 0.2, 0.3, 1, 2, 3, out=xs, backend=backend)
    assert torch.equal(xs, want)

    xc, xs = x.clone(), _strided(x)
    table = _table.pack([0.8, 0.9], [0.5, 0.3], [0.9, 0.9], [0.1, 0.2], [0.3, 0.2])
    t1 = ops.pointcloud_sample(xc, y, table, 5, 7, return_trajectory=True, backend=backend)
    t2 = ops.pointcloud_sample(xs, _strided(y), table, 5, 7, return_trajectory=True, backend=backend)
    assert torch.equal(xs, xc) and torch.equal(t1, t2) and not torch.equal(xc, x)


def test_compiled_glue_accepts_strided_in_place_tensors():
    """fastdiff._C itself (which the sampler calls) updates a non-contiguous x in place correctly."""
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    C = _backend.extension()
    x, y = _problem(M=6, N=5, d=3, seed=4, dtype=F32)
    table = _table.pack([0.8, 0.9], [0.5, 0.3], [0.9, 0.9], [0.1, 0.2], [0.3, 0.2])
    xc, xs = x.clone(), _strided(x)
    C.pointcloud_sample(xc, y, table, 5, 7, None, 0.0, False)
    C.pointcloud_sample(xs, y, table, 5, 7, None, 0.0, False)
    assert torch.equal(xs, xc)
    xc, xs = x.clone(), _strided(x)
    C.affine_step(xc, y[[0, 1, 2, 3, 4, 0]], 0.9, 0.2, 0.3, 1, 2, 3, xc)
    C.affine_step(xs, y[[0, 1, 2, 3, 4, 0]], 0.9, 0.2, 0.3, 1, 2, 3, xs)
    assert torch.equal(xs, xc)


def test_compiled_glue_refuses_sample_indices_past_the_limit():
    """fastdiff._C checks the counter range itself too (the sampler calls it directly)."""
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    C = _backend.extension()
    x = torch.zeros(8, 3)
    for offset in (2**63 - 8, 2**64 - 4):
        with pytest.raises(ValueError, match="sample_offset"):
            C.affine_step(x, x, 0.0, 0.0, 1.0, 1, 2, offset, x)
        with pytest.raises(ValueError, match="sample_offset"):
            C.pointcloud_step(x, x, torch.ones(1, dtype=F64), torch.ones(1, dtype=F64), 0.0, 0.0, 1.0, 1, 2, offset)
        with pytest.raises(ValueError, match="sample_offset"):
            C.pointcloud_sample(x, x, _table.pack([1.0], [1.0], [1.0], [1.0], [1.0]), 1, offset, None, 0.0, False)
    assert torch.equal(x, torch.zeros(8, 3))
    last = C.affine_step(x, x, 0.0, 0.0, 1.0, 1, 2, 2**63 - 9)          # the last 8 indices: the contract's noise
    assert torch.equal(last, fd.noise.normal(1, list(range(2**63 - 9, 2**63 - 1)), 2, 3))


def test_finite_scan_is_one_reduction_per_tensor():
    """_checks.minmax: (min, max) of several tensors with one host transfer; NaN shows in both."""
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    b = torch.tensor([0.0, NAN])
    got = _checks.minmax(a=a, b=b, empty=torch.empty(0, 3))
    assert got["a"] == (-2.0, 3.0) and all(math.isnan(v) for v in got["b"]) and got["empty"] is None


# -- aliasing, empty shapes under autograd, second derivatives (review of the ops) ---------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_step_into_a_history_buffer(backend):
    """out=D1 (a loop rotating its buffers): the backends write the one-step update before they read the history,
    so an out sharing D's or a history D's memory gets the result copied in (it used to be 0.98 off)."""
    dt, dev = _dtype(backend), _device(backend)
    x, y = _problem(M=6, N=6, d=3, dtype=dt, device=dev)
    D, D1, D2 = (y[torch.randperm(6, generator=_gen(k))] for k in range(3))
    hist = lambda a, b: ((0.4, a), (-0.2, b))             # noqa: E731
    want = ops.affine_step(x, D, 0.9, 0.3, 0.1, 5, 2, history=hist(D1, D2), backend=backend)
    for target in ("D", "D1", "D2"):
        bufs = {"D": D.clone(), "D1": D1.clone(), "D2": D2.clone()}
        out = bufs[target]
        got = ops.affine_step(x, bufs["D"], 0.9, 0.3, 0.1, 5, 2, history=hist(bufs["D1"], bufs["D2"]), out=out,
                              backend=backend)
        assert got is out and torch.equal(out, want), target
    view = torch.cat([D1, D2]).clone()                    # out a view of the same storage as a history D
    got = ops.affine_step(x, D, 0.9, 0.3, 0.1, 5, 2, history=((0.4, view[:6]), (-0.2, view[6:])), out=view[6:],
                          backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pointcloud_step_in_place_on_a_view_of_the_data(backend):
    dt, dev = _dtype(backend), _device(backend)
    _, y = _problem(M=6, N=300, d=3, dtype=dt, device=dev)          # several row blocks of every backend
    want = ops.pointcloud_step(y.clone(), y, 1.0, 0.5, 0.9, 0.1, 0.2, 3, 1, backend=backend)
    data = y.clone()
    x = data[:]                                           # no clone: x's rows are data's
    ops.pointcloud_step(x, data, 1.0, 0.5, 0.9, 0.1, 0.2, 3, 1, out=x, backend=backend)
    assert torch.equal(x, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_stay_in_the_autograd_graph(backend):
    dt, dev = _dtype(backend), _device(backend)
    _, y = _problem(dtype=dt, device=dev)
    x = torch.empty(0, 3, dtype=dt, device=dev, requires_grad=True)
    D = torch.empty(0, 3, dtype=dt, device=dev, requires_grad=True)
    for out in (ops.affine_step(x, D, 0.9, 0.3, 0.1, 0, 0, backend=backend),
                ops.pointcloud_step(x, y, 1.0, 0.3, 0.9, 0.1, 0.2, 0, 0, backend=backend)):
        assert out.requires_grad and out.shape == (0, 3)
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.shape == (0, 3)


def test_a_second_derivative_through_the_posterior_raises():
    """Gradient-penalty losses: grad(L, x, create_graph=True) then backward. The VJP is computed outside
    autograd, so the Hessian term used to be dropped without a word (x.grad off by up to 35)."""
    x, y = _problem()
    for fn, name in ((lambda xx: ops.posterior(xx, y, 0.9, 0.4)[1].sum(), "posterior"),
                     (lambda xx: ops.pointcloud_step(xx, y, 0.9, 0.4, 0.8, 0.3, 0.0, 0, 0).pow(2).sum(),
                      "pointcloud_step")):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xx), xx, create_graph=True)
        assert g.requires_grad
        with pytest.raises(RuntimeError, match=f"fastdiff.ops.{name} has no double backward"):
            (g * g).sum().backward()
        (g1,) = torch.autograd.grad(fn(xx), xx)            # first order alone is unchanged
        assert torch.equal(g1, g.detach())
    # affine_step is linear: its second derivative is exact (here 2·A² per element of x)
    xx, D = x.clone().requires_grad_(), y[:5].clone().requires_grad_()
    (g,) = torch.autograd.grad(ops.affine_step(xx, D, 0.7, 0.3, 0.0, 0, 0).pow(2).sum(), xx, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xx)
    assert torch.allclose(h, torch.full_like(h, 2 * 0.7 * 0.7), rtol=1e-15, atol=0)


def test_huge_integers_and_the_environment_backend_are_named(monkeypatch):
    x, y = _problem()
    for kw, name in (({"alpha": 10**400}, "alpha"), ({"sigma": 10**400}, "sigma"),
                     ({"bandwidth": 10**400}, "bandwidth")):
        args = {"alpha": 1.0, "sigma": 0.5, "bandwidth": 0.0, **kw}
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ops.posterior(x, y, args["alpha"], args["sigma"], bandwidth=args["bandwidth"])
    with pytest.raises(ValueError, match="A must be finite"):
        ops.affine_step(x, x, 10**400, 0.3, 0.0, 0, 0)
    with pytest.raises(ValueError, match=r"history\[0\] B must be finite"):
        ops.affine_step(x, x, 1.0, 0.3, 0.0, 0, 0, history=((10**400, x),))
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' \(from FASTDIFF_BACKEND\)"):
        ops.posterior(x, y, 1.0, 0.5)


@pytest.mark.parametrize("bad", ["0.1", True, b"1"])
def test_coefficients_and_bandwidth_refuse_strings_and_bools(bad):
    """float("0.1") and float(True) would pass: A, B, C and bandwidth raise TypeError naming themselves."""
    x, y = torch.randn(4, 2), torch.randn(10, 2)
    with pytest.raises(TypeError, match="^bandwidth must be a number"):
        fd.ops.posterior(x, y, 1.0, 0.5, None, bad, backend="torch")
    for i, name in enumerate("ABC"):
        coeffs = [0.5, 0.5, 0.0]
        coeffs[i] = bad
        with pytest.raises(TypeError, match=f"^{name} must be a number"):
            fd.ops.affine_step(x, x, *coeffs, 0, 0, backend="torch")
