"""affine_step(x, D, A, B, C, seed, step, sample_offset, out) -> x_s = A·x + B·D + C·z on every backend this
machine runs (tests/contract.py), through fastdiff.ops: the whole update to 4·eps(dtype)·(|ref| + 1) of the float64
value, and the noise z the contract's (fd.noise.normal): float32 bit for bit on the CPU build, within 8 ulps
elsewhere. Select one backend with -k, e.g. `-k cuda_emu`."""
import math

import pytest
import torch

import fastdiff as fd
from contract import CUDA, EPS32, F16, F32, F64, NOISE_ULPS, backend_dtypes, backends, device, fa_close, gen, step_tol
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
