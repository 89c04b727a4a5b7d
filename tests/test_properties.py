"""A property-based net over fastdiff.ops (issue 12, item 15), on every backend this machine has.

For random shapes (M, N, d including 0 and 1), dtypes, strides, extreme σ/α, NaN/inf placed anywhere and
noise offsets near the limits, every op (and fd.sample on a point cloud, for row independence) either
- returns the right answer: within the dtype's own error of the float64 torch reference on the same inputs
  (MATH.md §7 for the posterior where its leading logits are moderate, the dtype's eps·|logit| beyond), or
- raises ValueError/TypeError, and then the caller's tensors are unchanged;
and row i of a result never depends on the other rows (bit for bit against the op on that row alone).

Profiles (FASTDIFF_HYPOTHESIS_PROFILE): `ci` (default: 200 examples per test, 25 under the Triton interpreter,
about 30 s on two CPU cores, derandomised so CI is reproducible) and `long` (thousands of examples, random seeds:
run it before a release, e.g. `FASTDIFF_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py`). The Triton
backend runs under TRITON_INTERPRET=1 when there is no GPU: few, small examples there.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastdiff as fd  # noqa: E402
from fastdiff import _backend, _table, ops  # noqa: E402
from fastdiff.reference import posterior as ref_posterior  # noqa: E402

F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FASTDIFF_HYPOTHESIS_PROFILE", "ci"))
TRITON_EXAMPLES = 25 if settings().max_examples <= 200 else 400


def _available(name):
    if _backend.BACKENDS[name].unavailable_reasons():
        return False
    if name == "triton":
        from fastdiff.triton import _common
        return torch.cuda.is_available() or _common.interpreting()
    return True


FAST_BACKENDS = [b for b in ("cpu", "torch") if _available(b)]
TRITON = _available("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend):
    return "cpu" if backend == "cpu" else DEV


# ---------------------------------------------------------------- strategies
@st.composite
def cloud_case(draw, backend, max_m=6, max_n=5, max_d=5):
    """Inputs of a point-cloud op, sometimes with one bad value placed somewhere."""
    dtype = F32 if backend == "triton" else draw(st.sampled_from([F32, F64]))
    M, N = draw(st.integers(0, max_m)), draw(st.integers(1, max_n))
    d = draw(st.sampled_from([0] + list(range(1, max_d + 1)) * 3))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    y = scale * torch.randn(N, d, generator=g, dtype=F64)
    x = y[torch.arange(M) % N] * draw(st.sampled_from([0.5, 1.0])) + scale * torch.randn(M, d, generator=g, dtype=F64)
    case = dict(
        x=x.to(dtype), data=y.to(dtype),
        alpha=draw(st.sampled_from([0.0, 1e-6, 0.3, 0.999, 1.0, 2.5])),
        sigma=draw(st.sampled_from([1e-6, 1e-3, 0.2, 1.0, 1e3, 1e6])),
        log_weights=(torch.randn(N, generator=g, dtype=F64).to(dtype) if draw(st.booleans()) else None),
        bandwidth=draw(st.sampled_from([0.0, 0.0, 0.05, 2.0])),
        strided=draw(st.booleans()),
    )
    if case["log_weights"] is not None and N > 1 and draw(st.booleans()):
        case["log_weights"][0] = -INF                         # a zero-weight point (allowed)
    case["bad"] = draw(st.sampled_from([None] * 12 + ["x", "data", "log_weights", "alpha", "sigma", "bandwidth",
                                                     "all -inf"]))
    case["bad_value"] = draw(st.sampled_from([NAN, INF, -INF]))
    return case


def _apply_bad(case):
    """Place the drawn bad value; return the name the error must carry (None when the input stays valid)."""
    bad, v = case["bad"], case["bad_value"]
    if bad is None:
        return None
    if bad in ("x", "data"):
        t = case[bad]
        if t.numel() == 0:
            return None
        t[t.shape[0] // 2, t.shape[1] - 1] = v            # (any layout)
        return bad
    if bad == "log_weights":
        if case["log_weights"] is None or v == -INF:
            return None
        case["log_weights"][-1] = v
        return "log_weights"
    if bad == "all -inf":
        case["log_weights"] = torch.full((case["data"].shape[0],), -INF, dtype=case["data"].dtype)
        return "log_weights"
    case[bad] = v
    return bad


def _layout(t, strided):
    if t is None or not strided or t.ndim != 2:
        return t
    return t.T.contiguous().T


def _on(case, backend):
    dev = _device(backend)
    out = dict(case)
    for k in ("x", "data", "log_weights"):
        if isinstance(out[k], torch.Tensor):
            out[k] = _layout(out[k].to(dev), case["strided"])
    return out


def _posterior_tol(dtype, y):
    """MATH.md §7 for float32 (max|D − D64| ≤ 1e-4·max|y|, |L − L64| ≤ 1e-3 + 1e-6|L|); float64: 1e-9."""
    scale = float(y.abs().max()) if y.numel() else 1.0
    return (1e-4, 1e-3) if dtype == F32 else (1e-9, 1e-9), scale + 1e-300


def _expect_error(fn, names, *tensors):
    """fn raises ValueError/TypeError naming one of `names` (the op checks in its own order), and leaves
    `tensors` unchanged (NaN in place included)."""
    names = [names] if isinstance(names, str) else names
    keep = [t.clone() for t in tensors]
    hypothesis.event("clear error")
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    assert any(n in str(info.value) for n in names), (names, str(info.value))
    for t, k in zip(tensors, keep, strict=True):
        assert torch.equal(t.isnan(), k.isnan()) and torch.equal(t.nan_to_num(), k.nan_to_num())


def _check_posterior(backend, case):
    c = _on(case, backend)
    x, y = c["x"], c["data"]
    if x.shape[1] == 0:
        return _expect_error(lambda: ops.posterior(x, y, c["alpha"], c["sigma"], c["log_weights"], c["bandwidth"],
                                                   backend=backend), "x", x)
    name = _apply_bad(c)
    call = lambda xx, **kw: ops.posterior(xx, c["data"], c["alpha"], c["sigma"], c["log_weights"],  # noqa: E731
                                          c["bandwidth"], backend=backend, **kw)
    if name is not None:
        return _expect_error(lambda: call(c["x"]), name, c["x"])
    x_before = x.clone()
    try:
        D, L = call(x)
    except ValueError as exc:      # an explicit float32-only backend refuses rows that need float64: clear
        if backend == "triton" and "need float64" in str(exc):
            assert torch.equal(x, x_before)
            return
        raise
    assert torch.equal(x, x_before)
    assert D.shape == x.shape and L.shape == (x.shape[0],) and D.dtype == x.dtype
    lw64 = None if c["log_weights"] is None else c["log_weights"].double().cpu()
    D64, L64 = ref_posterior(x.double().cpu(), y.double().cpu(), c["alpha"], c["sigma"], lw64, c["bandwidth"])
    (tD, tL), scale = _posterior_tol(x.dtype, y.double())
    assert torch.isfinite(D).all() and torch.isfinite(L).all()
    errD = (D.double().cpu() - D64).abs().amax(1) if D.numel() else torch.zeros(0, dtype=F64)
    # kernel-density data add (αv/c)·x to D, which can exceed max|y| by far: the bound scales with |D| too
    scaleD = max(scale, float(D64.abs().max()) if D64.numel() else 0.0)
    # The logits themselves carry the dtype's rounding, eps·|logit|, and the weights that much relative error:
    # MATH.md §7's 1e-4 holds where the leading logits are moderate (queries near the data, as in sampling);
    # for a query far from every point (|L| ~ 1e6) no float32 method keeps the weights, and the bound says so.
    cond = 4 * torch.finfo(x.dtype).eps * (L64.abs() + 40)
    assert bool((errD <= scaleD * (tD + cond.clamp(max=2))).all()), (errD, scaleD, cond)
    # L: §7's 1e-3 + 1e-6|L| in float32, and never below a few roundings of the leading logit (16 eps|L|: at
    # σ = 1e-6, outside §7's range, |L| reaches 1e9)
    rel = max(tL * 1e-3, 16 * torch.finfo(x.dtype).eps)
    assert bool(((L.double().cpu() - L64).abs() <= tL + rel * L64.abs()).all())
    for i in range(x.shape[0]):                                 # row i alone gives the same bits
        Di, Li = call(x[i:i + 1])
        assert torch.equal(Di[0], D[i]) and torch.equal(Li[0], L[i]), i


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(data=st.data())
def test_posterior_right_or_clear_error(backend, data):
    _check_posterior(backend, data.draw(cloud_case(backend)))


@pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and no interpreter)")
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_posterior_right_or_clear_error_triton(data):
    _check_posterior("triton", data.draw(cloud_case("triton", max_m=3, max_n=3, max_d=3)))


# ---------------------------------------------------------------- affine step and the noise counters
OFFSETS = [0, 0, 5, 5, 2**32 - 2, 2**32 - 2, 2**63 - 12, 2**63 - 12, 2**63 - 1, 2**64 - 4, -1]   # mostly valid


@st.composite
def affine_case(draw, backend):
    dtype = F32 if backend == "triton" else draw(st.sampled_from([F32, F64]))
    M, d = draw(st.integers(0, 6)), draw(st.sampled_from([0] + list(range(1, 10)) * 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    coeff = st.sampled_from([0.0, 1.0, -0.5, 3.0, 1e-8, 1e8])
    return dict(x=torch.randn(M, d, generator=g, dtype=F64).to(dtype),
                D=torch.randn(M, d, generator=g, dtype=F64).to(dtype),
                A=draw(coeff), B=draw(coeff), C=draw(coeff), seed=draw(st.sampled_from([0, 7, 2**64 - 1])),
                step=draw(st.sampled_from([0, 3, 2**32 - 1])), offset=draw(st.sampled_from(OFFSETS)),
                in_place=draw(st.booleans()), strided=draw(st.booleans()),
                bad=draw(st.sampled_from([None] * 10 + ["x", "D", "A", "B", "C"])),
                bad_value=draw(st.sampled_from([NAN, INF, -INF])))


def _check_affine(backend, case):
    dev = _device(backend)
    x, D = (_layout(case[k].to(dev), case["strided"]) for k in ("x", "D"))
    A, B, C = case["A"], case["B"], case["C"]
    bad, names = case["bad"], []
    if bad in ("x", "D") and x.numel():
        (x if bad == "x" else D)[0, 0] = case["bad_value"]
        names.append(bad)
    elif bad in ("A", "B", "C"):
        A, B, C = (case["bad_value"] if n == bad else v for n, v in (("A", A), ("B", B), ("C", C)))
        names.append(bad)
    M, d = x.shape
    if d == 0:
        names.append("x")
    if not 0 <= case["offset"] <= 2**63 - 1 - M:
        names.append("sample_offset")
    out = x if case["in_place"] else None
    call = lambda: ops.affine_step(x, D, A, B, C, case["seed"], case["step"], case["offset"], out=out,  # noqa: E731
                                   backend=backend)
    if names:
        return _expect_error(call, names, x, D)
    x0 = x.clone()
    res = call()
    if case["in_place"]:
        assert res is x
    z = fd.noise.normal(case["seed"], list(range(case["offset"], case["offset"] + M)), case["step"], d, dtype=F64) \
        if M else torch.zeros(0, d, dtype=F64)
    terms = (A * x0.double().cpu(), B * D.double().cpu(), C * z)
    ref = terms[0] + terms[1] + terms[2]
    eps = torch.finfo(x.dtype).eps
    z_ulps = 8 if backend == "triton" else 2          # triton's Box-Muller runs in float32
    tol = 4 * eps * sum(t.abs() for t in terms) + z_ulps * eps * abs(C) * (z.abs() + 1)
    assert bool(((res.double().cpu() - ref).abs() <= tol).all())
    if M > 1:
        i = M - 1                                        # the last row alone: global sample offset + i
        alone = ops.affine_step(x0[i:i + 1], D[i:i + 1], A, B, C, case["seed"], case["step"], case["offset"] + i,
                                backend=backend)
        assert torch.equal(alone[0], res[i])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(data=st.data())
def test_affine_step_right_or_clear_error(backend, data):
    _check_affine(backend, data.draw(affine_case(backend)))


@pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and no interpreter)")
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_affine_step_right_or_clear_error_triton(data):
    _check_affine("triton", data.draw(affine_case("triton")))


# ---------------------------------------------------------------- whole trajectories
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(data=st.data())
def test_pointcloud_sample_right_or_clear_error(backend, data):
    case = data.draw(cloud_case(backend, max_m=4, max_n=4, max_d=3))
    K = data.draw(st.integers(1, 3))
    table = {k: [data.draw(st.sampled_from(vals)) for _ in range(K)] for k, vals in
             (("alpha", [0.5, 0.9, 1.0]), ("sigma", [1e-3, 0.3, 2.0]), ("A", [0.9, 1.0]), ("B", [0.1, 0.0]),
              ("C", [0.0, 0.2]))}
    bad_col = data.draw(st.sampled_from([None] * 10 + ["alpha", "sigma", "A", "B", "C"]))
    offset = data.draw(st.sampled_from(OFFSETS))
    c = _on(case, backend)
    x = c["x"]
    names = []
    if x.shape[1] == 0:
        names.append("x")
    if bad_col is not None:
        table[bad_col][-1] = case["bad_value"]
        names.append("B0" if bad_col == "B" else bad_col)      # the kernel table's column name
    if not 0 <= offset <= 2**63 - 1 - x.shape[0]:
        names.append("sample_offset")
    if c["bad"] not in ("alpha", "sigma"):       # (those two are the table's here)
        bad = _apply_bad(c)
        names += [bad] if bad else []
    kernel_table = _table.pack(*(table[k] for k in ("alpha", "sigma", "A", "B", "C")))

    def call(xx, off):
        return ops.pointcloud_sample(xx, c["data"], kernel_table, 3, off, c["log_weights"], c["bandwidth"],
                                     return_trajectory=True, backend=backend)
    if names:
        return _expect_error(lambda: call(x, offset), names, x)
    x0 = x.clone()
    traj = call(x, offset)
    assert traj.shape == (K + 1, *x.shape) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    assert torch.isfinite(traj).all()
    if x.shape[0] > 1:                                  # row 0 alone: the same bits
        xi = x0[:1].clone()
        ti = call(xi, offset)
        assert torch.equal(ti[:, 0], traj[:, 0])


# ---------------------------------------------------------------- the fused step
def _check_pointcloud_step(backend, case, coeffs, offset, in_place):
    c = _on(case, backend)
    x = c["x"]
    A, B, C = coeffs
    names = []
    if x.shape[1] == 0:
        names.append("x")
    if not 0 <= offset <= 2**63 - 1 - x.shape[0]:
        names.append("sample_offset")
    bad = _apply_bad(c)
    names += [bad] if bad else []
    out = x if in_place else None
    call = lambda xx, off, out=None: ops.pointcloud_step(  # noqa: E731
        xx, c["data"], c["alpha"], c["sigma"], A, B, C, 9, 4, off, c["log_weights"], c["bandwidth"], out=out,
        backend=backend)
    if names:
        return _expect_error(lambda: call(x, offset, out), names, x)
    x0 = x.clone()
    try:
        res = call(x, offset, out)
    except ValueError as exc:      # an explicit float32-only backend refuses rows that need float64: clear
        if backend == "triton" and "need float64" in str(exc):
            assert torch.equal(x, x0)
            return
        raise
    assert res.shape == x.shape and (res is x) == in_place
    M, d = x.shape
    y64, x64 = c["data"].double().cpu(), x0.double().cpu()
    lw64 = None if c["log_weights"] is None else c["log_weights"].double().cpu()
    D64, L64 = ref_posterior(x64, y64, c["alpha"], c["sigma"], lw64, c["bandwidth"]) if M else (x64, x64[:, 0])
    z = fd.noise.normal(9, list(range(offset, offset + M)), 4, d, dtype=F64) if M else torch.zeros(0, d, dtype=F64)
    terms = (A * x64, B * D64, C * z)
    eps = torch.finfo(x.dtype).eps
    (tD, _), scale = _posterior_tol(x.dtype, y64)
    scaleD = max(scale, float(D64.abs().max()) if M else 0.0)
    errD = scaleD * (tD + (4 * eps * (L64.abs() + 40)).clamp(max=2)).unsqueeze(1)
    tol = abs(B) * errD + 4 * eps * sum(t.abs() for t in terms) + 8 * eps * abs(C) * (z.abs() + 1)
    assert bool(((res.double().cpu() - sum(terms)).abs() <= tol).all())
    if M > 1:
        i = M - 1
        alone = call(x0[i:i + 1].clone(), offset + i)
        assert torch.equal(alone[0], res[i])


COEFFS = st.tuples(*(st.sampled_from(v) for v in ([0.9, 1.0, 0.0, -2.0], [0.1, 0.0, 1.0, 1e3], [0.0, 0.3, 1e-3])))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(data=st.data())
def test_pointcloud_step_right_or_clear_error(backend, data):
    _check_pointcloud_step(backend, data.draw(cloud_case(backend)), data.draw(COEFFS),
                           data.draw(st.sampled_from(OFFSETS)), data.draw(st.booleans()))


@pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and no interpreter)")
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_pointcloud_step_right_or_clear_error_triton(data):
    _check_pointcloud_step("triton", data.draw(cloud_case("triton", max_m=3, max_n=3, max_d=3)), data.draw(COEFFS),
                           data.draw(st.sampled_from(OFFSETS)), data.draw(st.booleans()))


# ---------------------------------------------------------------- the sampler on a point cloud
@pytest.mark.filterwarnings("ignore::fastdiff.GridWarning")      # 1-4 steps: poor grids, on purpose
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=max(10, settings().max_examples // 10))
@given(data=st.data())
def test_sample_rows_are_independent_and_finite(backend, data):
    """fd.sample on a point cloud: finite, and sample i equals the run of that sample alone (batch invariance,
    any chunk_size), or a clear error for a bad sample_offset."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    d = data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from([F32, F64]))
    cloud = fd.PointCloud(torch.randn(data.draw(st.integers(1, 6)), d, generator=g, dtype=dtype),
                          data.draw(st.sampled_from([fd.VP(0.1, 20.0), fd.OU(0.5, 1.0, 10.0), fd.PureVE(10.0)])))
    n = data.draw(st.integers(1, 5))
    kw = dict(steps=data.draw(st.integers(1, 4)), seed=data.draw(st.sampled_from([0, 2**64 - 1])),
              ode=data.draw(st.booleans()), backend=backend, dtype=dtype)
    offset = data.draw(st.sampled_from([0, 3, 2**40, 2**63 - 1 - n]))
    x = fd.sample(cloud, n=n, sample_offset=offset, chunk_size=data.draw(st.integers(1, 5)), **kw)
    assert x.shape == (n, d) and x.dtype == dtype and torch.isfinite(x).all()
    i = data.draw(st.integers(0, n - 1))
    assert torch.equal(fd.sample(cloud, n=1, sample_offset=offset + i, **kw)[0], x[i])
