"""affine_step(x, D, A, B, C, seed, step, sample_offset, out) -> x_s = A·x + B·D + C·z on every backend this
machine runs (tests/contract.py), through fastdiff.ops: the whole update to 4·eps(dtype)·(|ref| + 1) of the float64
value, and the noise z the contract's (fd.noise.normal): float32 bit for bit on the CPU build, within 8 ulps
elsewhere. Select one backend with -k, e.g. `-k cuda_emu`."""
import math

import pytest
import torch

import fastdiff as fd
from contract import (
    CUDA,
    EPS32,
    F16,
    F32,
    F64,
    NOISE_ULPS,
    backend_dtypes,
    backends,
    close64,
    device,
    fa_close,
    gen,
    step_tol,
)
from fastdiff import ops
from fastdiff.reference import affine_step as ref_affine


def _bit_exact_f32(backend):
    """Backends whose float32 normals are fd.noise.normal's bit for bit (Box–Muller in double)."""
    return backend in ("torch", "cpu", "cuda_emu")


def binade_ulps(z, z64):
    """|z − z64| in units of the float32 ulp of z64's binade."""
    ulp = EPS32 * torch.exp2(torch.floor(torch.log2(z64.abs().clamp_min(1e-30))))
    return (z.double().cpu() - z64).abs() / ulp


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, d", [(301, 7), (5, 1030), (999, 2)])
def test_affine_step_noise_is_the_contract(backend, dtype, M, d):
    """Box–Muller in float64 from the float32 uniforms with the reference's angle fl64(2π·u), then rounded; the
    update out of place, in place (out = x), and C = 0 draws nothing."""
    seed, step, off = 2**40 + 5, 17, 2**33
    dev = device(backend)
    zero = torch.zeros(M, d, dtype=dtype, device=dev)
    zk = ops.affine_step(zero, zero, 1.0, 0.0, 1.0, seed, step, off, backend=backend).cpu()
    z64 = fd.noise.normal(seed, torch.arange(off, off + M), step, d, dtype=F64)
    if backend in ("cpu", "torch") or dtype == F32 and _bit_exact_f32(backend):
        # double Box–Muller like the reference: float32 bit for bit, float64 to the libm's last ulp
        want = z64.to(dtype)
        assert torch.equal(zk, want) if dtype == F32 else torch.allclose(zk, want, rtol=4e-16, atol=4e-16)
    else:
        ulps = (zk.double() - z64).abs() / (torch.finfo(dtype).eps * z64.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= NOISE_ULPS, float(ulps.max())
    x = torch.randn(M, d, generator=gen(9), dtype=dtype)
    D = torch.randn(M, d, generator=gen(10), dtype=dtype)
    out = ops.affine_step(x.to(dev), D.to(dev), 0.9, 0.2, 1.3, seed, step, off, backend=backend)
    ref = 0.9 * x.double() + 0.2 * D.double() + 1.3 * z64
    assert bool(((out.cpu().double() - ref).abs() <= step_tol(ref, dtype)).all())
    xi = x.clone().to(dev)
    ops.affine_step(xi, D.to(dev), 0.9, 0.2, 1.3, seed, step, off, out=xi, backend=backend)
    assert torch.equal(xi, out)
    ode = ops.affine_step(x.to(dev), D.to(dev), 0.5, 0.5, 0.0, seed, step, off, backend=backend).cpu()
    assert torch.allclose(ode, (0.5 * x.double() + 0.5 * D.double()).to(dtype), atol=4 * torch.finfo(dtype).eps)
    xi = x.clone().to(dev)                              # the ODE step in place too
    ops.affine_step(xi, D.to(dev), 0.5, 0.5, 0.0, 0, 0, out=xi, backend=backend)
    assert torch.equal(xi.cpu(), ode)


# Triton under the interpreter: minutes of draws for no new path (its noise kernels: tests/test_triton.py)
@pytest.mark.parametrize("backend", backends(exclude=() if CUDA else ("triton",)))
@pytest.mark.parametrize("M, d", [(2001, 1), (999, 2), (4099, 3), (300, 8), (700, 67), (5, 1030)])
def test_affine_step_float32_noise_in_bulk(backend, M, d):
    """Many draws, shapes that split quads, rows and the CPU generator's 256-quad blocks unevenly: the float32
    noise is the reference's (bit for bit where Box–Muller runs in double; to a few float32 ulps elsewhere),
    and its moments are a standard normal's."""
    dev = device(backend)
    zero = torch.zeros(M, d, device=dev)
    zk = ops.affine_step(zero, zero, 1.0, 0.0, 1.0, seed=987654321987, step=3, sample_offset=2**32 - 2,
                         backend=backend).cpu()
    z64 = fd.noise.normal(987654321987, torch.arange(2**32 - 2, 2**32 - 2 + M), 3, d, dtype=F64)
    if _bit_exact_f32(backend):
        assert torch.equal(zk, z64.float())
    else:
        ulps = (zk.double() - z64).abs() / (EPS32 * z64.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= NOISE_ULPS
    n = zk.numel()
    assert abs(float(zk.double().mean())) < 5 / math.sqrt(n)
    assert abs(float(zk.double().var()) - 1) < 5 * math.sqrt(2 / n)
    # the whole update, out of place and in place (out = x), against float64
    x = torch.randn(M, d, generator=gen(M + d)).to(dev)
    D = torch.randn(M, d, generator=gen(M * d)).to(dev)
    ref = 0.97 * x.double().cpu() + 0.05 * D.double().cpu() + 0.3 * z64
    got = ops.affine_step(x, D, 0.97, 0.05, 0.3, 987654321987, 3, 2**32 - 2, backend=backend)
    ops.affine_step(x, D, 0.97, 0.05, 0.3, 987654321987, 3, 2**32 - 2, out=x, backend=backend)
    assert torch.equal(x, got)
    err = float((got.cpu().double() - ref).abs().max())
    assert err <= 4 * EPS32 * (float(ref.abs().max()) + 1)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("M, d", [(1, 1), (7, 3), (129, 7), (3, 129)])
def test_affine_step_matches_the_reference(backend, M, d):
    g = gen(M * 1000 + d)
    x = torch.randn(M, d, generator=g)
    D = 3 * torch.randn(M, d, generator=g)
    seed, step, off = 2**63 + 12345, 2**32 - 1, 2**32 - 2
    dev = device(backend)
    for A, B, C in [(0.93, 0.21, 0.37), (1.0, -2.5, 0.0), (-0.5, 1e-3, 11.0)]:
        out = ops.affine_step(x.to(dev), D.to(dev), A, B, C, seed, step, off, backend=backend)
        r64 = ref_affine(x.double(), D.double(), A, B, C, seed, step, off)
        r32 = ref_affine(x, D, A, B, C, seed, step, off)
        fa_close(out, r64, r32, f"affine {A, B, C}")


@pytest.mark.parametrize("backend", backends())
def test_affine_step_noise_and_out_in_place_separate_and_batch_invariant(backend):
    """Normals within 4 float32 ulps (of z64's binade) of the float64 Box–Muller; out = x, a separate out and a
    slice with its sample_offset all give the same rows bit for bit."""
    M, d = 65, 10
    dev = device(backend)
    x = torch.randn(M, d, generator=gen(65)).to(dev)
    D = torch.randn(M, d, generator=gen(66)).to(dev)
    z = ops.affine_step(x, D, 0.0, 0.0, 1.0, 7, 3, 100, backend=backend)
    z64 = fd.noise.normal(7, range(100, 100 + M), 3, d, dtype=F64)
    assert float(binade_ulps(z, z64).max()) <= 4
    out = ops.affine_step(x, D, 0.8, 0.3, 0.5, 7, 3, 0, backend=backend)
    y = x.clone()
    assert ops.affine_step(y, D, 0.8, 0.3, 0.5, 7, 3, 0, out=y, backend=backend) is y
    assert torch.equal(y, out)
    o = torch.full_like(x, float("nan"))
    assert ops.affine_step(x, D, 0.8, 0.3, 0.5, 7, 3, 0, out=o, backend=backend) is o and torch.equal(o, out)
    part = ops.affine_step(x[20:40], D[20:40], 0.8, 0.3, 0.5, 7, 3, 20, backend=backend)
    assert torch.equal(part, out[20:40])


@pytest.mark.parametrize("backend", backends())
def test_affine_step_half_precision_D(backend):
    M, d = 33, 5
    dev = device(backend)
    x = torch.randn(M, d, generator=gen(33))
    A, B, C = 0.7, -0.3, 0.45
    z = fd.noise.normal(9, range(M), 4, d, dtype=F64)
    for dt in (F32, F16, torch.bfloat16):
        D = torch.randn(M, d, generator=gen(34)).to(dt)
        out = ops.affine_step(x.to(dev), D.to(dev), A, B, C, 9, 4, 0, backend=backend)
        r64 = A * x.double() + B * D.double() + C * z
        r32 = (A * x + B * D.float()) + C * z.float()
        fa_close(out, r64, r32, f"D {dt}")


@pytest.mark.parametrize("backend", backends())
def test_global_sample_indices_beyond_32_bits(backend):
    """Sample indices past 2³² use the counter's high word; the kernels take them as uint64."""
    dev = device(backend)
    x = torch.zeros(4, 9, device=dev)
    out = ops.affine_step(x, x, 1.0, 0.0, 1.0, seed=1, step=2, sample_offset=2**32 + 7, backend=backend).cpu()
    z = fd.noise.normal(1, torch.arange(2**32 + 7, 2**32 + 11), 2, 9, dtype=F64)
    assert float(binade_ulps(out, z).max()) <= 4
    if _bit_exact_f32(backend):
        assert torch.equal(out, z.float())
    assert not torch.equal(out, fd.noise.normal(1, torch.arange(7, 11), 2, 9))


# ---------------------------------------------------------------- the multistep history (issue 14 §4)
def _history_case(M, d, dtype, seed):
    """x, D and two history D's (the second stored in float16 once, as a model's output may be), with
    coefficients of both signs and mixed sizes."""
    g = gen(seed)
    x, D, D1 = (s * torch.randn(M, d, generator=g, dtype=dtype) for s in (1.0, 3.0, 2.0))
    D2 = torch.randn(M, d, generator=g, dtype=dtype)
    return x, D, D1, D2


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, d", [(1, 1), (7, 3), (129, 7), (3, 129)])
def test_affine_step_history_matches_the_reference(backend, dtype, M, d):
    """x_s = A x + B D + C z + B1 D1 + B2 D2 against the float64 reference (float32: fa_close against the
    reference's own float32 error; float64: close64), with one and two history terms, out of place, in place in
    a strided x (out=x), and a zero coefficient keeping every bit of the one-step update."""
    dev = device(backend)
    x, D, D1, D2 = _history_case(M, d, dtype, 1000 * M + d)
    seed, step, off = 2**63 + 99, 41, 2**32 + 3
    for A, B, C, B1, B2 in [(0.93, 0.21, 0.37, 1.4, -0.45), (1.0, -2.5, 0.0, -0.6, 0.0), (-0.5, 1e-3, 11.0, 0.3, 2.2)]:
        hist = ((B1, D1), (B2, D2))
        for n_terms in (1, 2):
            h = hist[:n_terms]
            out = ops.affine_step(x.to(dev), D.to(dev), A, B, C, seed, step, off, history=tuple(
                (b, t.to(dev)) for b, t in h), backend=backend)
            flat = [a for b, t in h for a in (t, b)]
            r64 = ref_affine(x.double(), D.double(), A, B, C, seed, step, off, None,
                             *[a.double() if isinstance(a, torch.Tensor) else a for a in flat])
            if dtype == F64:
                close64(out, r64, f"history {A, B, C, h[0][0]}, {n_terms} terms")
            else:
                fa_close(out, r64, ref_affine(x, D, A, B, C, seed, step, off, None, *flat), f"history {n_terms}")
            # in place in a strided x: the caller's tensor, whatever its layout, gets the same bits
            base = torch.full((M, 2 * d), float("nan"), dtype=dtype, device=dev)
            xs = base[:, ::2]
            xs.copy_(x.to(dev))
            assert ops.affine_step(xs, D.to(dev), A, B, C, seed, step, off, out=xs,
                                   history=tuple((b, t.to(dev)) for b, t in h), backend=backend) is xs
            assert torch.equal(xs, out)
            assert bool(torch.isnan(base[:, 1::2]).all())          # nothing written between the columns
        # a zero coefficient adds (and reads) nothing: the one-step update's bits
        one = ops.affine_step(x.to(dev), D.to(dev), A, B, C, seed, step, off, backend=backend)
        zero = ops.affine_step(x.to(dev), D.to(dev), A, B, C, seed, step, off,
                               history=((0.0, D1.to(dev)), (0.0, D2.to(dev))), backend=backend)
        assert torch.equal(one, zero)


@pytest.mark.parametrize("backend", backends())
def test_affine_step_history_in_half_precision_and_separate_out(backend):
    """History D's stored in float16/bfloat16 are upcast on load (as D); out= a separate tensor."""
    M, d = 33, 5
    dev = device(backend)
    x, D, D1, D2 = _history_case(M, d, F32, 77)
    for dt in (torch.float16, torch.bfloat16):
        h1, h2 = D1.to(dt), D2.to(dt)
        o = torch.full_like(x, float("nan")).to(dev)
        ops.affine_step(x.to(dev), D.to(dev), 0.7, -0.3, 0.45, 9, 4, 0, out=o,
                        history=((0.8, h1.to(dev)), (-0.35, h2.to(dev))), backend=backend)
        r64 = ref_affine(x.double(), D.double(), 0.7, -0.3, 0.45, 9, 4, 0, None, h1.double(), 0.8, h2.double(), -0.35)
        r32 = ref_affine(x, D, 0.7, -0.3, 0.45, 9, 4, 0, None, h1.float(), 0.8, h2.float(), -0.35)
        fa_close(o, r64, r32, f"history {dt}")


@pytest.mark.parametrize("backend", backends())
def test_affine_step_bad_history_is_named_and_x_untouched(backend):
    dev = device(backend)
    x, D, D1, D2 = (t.to(dev) for t in _history_case(6, 3, F32, 5))
    nan = D2.clone()
    nan[4, 2] = float("nan")
    cases = [
        ([(0.5, D1)], None, None),                                           # a list of pairs is fine
        (D1, TypeError, "history must be a tuple"),
        (((0.5, D1), (0.2, D2), (0.1, D1)), ValueError, "at most two"),
        ((D1,), TypeError, r"history\[0\] must be a \(B, D\) pair"),
        (((0.5, D1[:, :2]),), ValueError, r"history\[0\] D must have shape \(6, 3\)"),
        (((0.5, D1), (0.2, D2.to(torch.int32))), TypeError, r"history\[1\] D must be a floating tensor"),
        (((0.5, D1), (0.2, torch.empty(6, 3, device="meta"))), ValueError, r"history\[1\] D is on meta"),
        (((0.5, D1), (0.2, nan)), ValueError, r"history\[1\] D contains NaN or inf"),
        ((("a", D1),), TypeError, r"history\[0\] B must be a number"),
        (((float("inf"), D1),), ValueError, r"history\[0\] B must be finite"),
    ]
    for history, error, message in cases:
        xi = x.clone()
        if error is None:
            ops.affine_step(xi, D, 0.9, 0.1, 0.3, 1, 2, out=xi, history=history, backend=backend)
            assert not torch.equal(xi, x)
            continue
        with pytest.raises(error, match=message):
            ops.affine_step(xi, D, 0.9, 0.1, 0.3, 1, 2, out=xi, history=history, backend=backend)
        assert torch.equal(xi, x), message
    # check_values=False skips the value scan only (a NaN in the history then reaches the result, unscanned)
    got = ops.affine_step(x, D, 0.9, 0.1, 0.3, 1, 2, history=((0.2, nan),), backend=backend, check_values=False)
    assert bool(torch.isnan(got[4, 2])) and bool(torch.isfinite(got[:4]).all())


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_affine_step_history_gradients(backend):
    """∂/∂x = A, ∂/∂D = B, ∂/∂D_j = B_j (float64, backend-independent): torch.autograd.gradcheck on x, D and both
    history D's, with and without noise, and with one history term."""
    M, d = 5, 3
    x, D, D1, D2 = (t.requires_grad_() for t in _history_case(M, d, F64, 11))
    for C in (0.0, 0.6):
        def f(x, D, D1, D2, C=C):
            return ops.affine_step(x, D, 0.9, -0.4, C, 3, 7, 2, history=((1.3, D1), (-0.7, D2)), backend=backend)
        assert torch.autograd.gradcheck(f, (x, D, D1, D2))

        def g(x, D, D1, C=C):
            return ops.affine_step(x, D, 0.9, -0.4, C, 3, 7, 2, history=((1.3, D1),), backend=backend)
        assert torch.autograd.gradcheck(g, (x, D, D1))
    # the gradient values themselves, and a float32 history D's gradient comes back in its own dtype
    h = D1.detach().float().requires_grad_()
    out = ops.affine_step(x, D, 0.9, -0.4, 0.6, 3, 7, 2, history=((1.3, h), (-0.7, D2)), backend=backend)
    w = torch.randn(M, d, generator=gen(3), dtype=F64)
    gx, gD, g1, g2 = torch.autograd.grad((out * w).sum(), (x, D, h, D2))
    assert torch.equal(gx, 0.9 * w) and torch.equal(gD, -0.4 * w) and torch.equal(g2, -0.7 * w)
    assert g1.dtype == F32 and torch.equal(g1, (1.3 * w).float())


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_affine_stepper_is_affine_step_in_place(backend, dtype):
    """ops.affine_stepper (fd.sample's model loop: checks once per run) gives affine_step(..., out=x)'s bits
    step after step, with 0, 1 and 2 history terms and a non-contiguous D; it still names a D unlike x and a
    step outside the run, and refuses an x it cannot update in place."""
    dev = device(backend)
    x, D, D1, D2 = (t.to(dev) for t in _history_case(37, 5, dtype, 77))
    seed, off, K = 2**63 + 5, 2**32 + 1, 3
    want, got = x.clone(), x.clone()
    step = ops.affine_stepper(got, seed, off, K, backend=backend)
    Dt = D.t().contiguous().t()                                  # same values, column-major
    for k, hist in enumerate([(), ((1.4, D1),), ((-0.6, D1), (2.2, D2))]):
        ops.affine_step(want, D, 0.9, 0.2, 0.3, seed, k, off, out=want, history=hist, backend=backend)
        assert step(k, Dt, 0.9, 0.2, 0.3, hist) is got
        assert torch.equal(got, want), k
    before = got.clone()
    with pytest.raises(ValueError, match="D must be a tensor like x"):
        step(0, D[:5], 0.9, 0.2, 0.3)
    with pytest.raises(ValueError, match="history D1 must be a tensor like x"):
        step(0, D, 0.9, 0.2, 0.3, ((1.0, D1.to(F16)),))
    with pytest.raises(ValueError, match=r"step must be in \[0, 3\)"):
        step(K, D, 0.9, 0.2, 0.3)
    assert torch.equal(got, before)                              # refused steps wrote nothing
    with pytest.raises(ValueError, match="contiguous"):
        ops.affine_stepper(x.t(), seed, off, K, backend=backend)
    with pytest.raises(ValueError, match="sample_offset"):
        ops.affine_stepper(x, seed, 2**63 - 2, K, backend=backend)
