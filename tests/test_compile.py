"""fastdiff.ops under torch.compile (issue 14, item 4): the ops are torch.library custom ops (torch.ops.fastdiff.*)
with fake implementations and autograd, so a user loop compiled with fullgraph=True has no graph break, computes
the same bits as eager, and does not recompile as the step's numbers and counters change. On the CPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # as the other test files: set before torch._dynamo.testing imports triton, which reads it once (a later test
    # module's setdefault would then leave the Triton kernels uninterpreted, and fail, on a machine with no GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._dynamo.testing import CompileCounterWithBackend

from fastdiff import _backend, ops
from fastdiff._table import pack as pack_table

F32, F64 = torch.float32, torch.float64
BACKENDS = [pytest.param(name, id=name, marks=(pytest.mark.skip(reason="; ".join(why)),) if why else ())
            for name in ("cpu", "torch") for why in [_backend.BACKENDS[name].unavailable_reasons()]]
SEED = 2**64 - 5          # above 2**63: travels as its int64 bit pattern


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cloud(M=6, N=9, d=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(N, d, generator=g, dtype=F64)
    x = y[torch.arange(M) % N] + 0.5 * torch.randn(M, d, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


def _table(K):
    """Per-step numbers that all change from step to step (a DDPM-like ancestral table)."""
    return [dict(alpha=0.5 + 0.05 * k, sigma=1.0 - 0.08 * k, A=0.97 - 0.01 * k, B=0.05 + 0.01 * k, C=0.3 - 0.02 * k)
            for k in range(K)]


# ------------------------------------------------------------------ each op passes torch.library.opcheck
def _opcheck_cases(backend):
    x, y = _cloud()
    lw = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    n = lambda v: torch.scalar_tensor(v, dtype=F64)  # noqa: E731 (numbers cross the boundary as 0-d tensors)
    per_row = torch.linspace(0.6, 0.9, x.shape[0], dtype=F64)
    cloud = (x, y, per_row, n(0.7))
    table = pack_table([0.6, 0.8], [0.9, 0.5], [0.98, 0.96], [0.05, 0.1], [0.2, 0.1])
    return {
        "posterior": (x.clone().requires_grad_(), y, per_row, n(0.7), lw, n(0.2), backend),
        # the multistep history D1, D2 (gradients to both), and without it
        "affine_step": (x.clone().requires_grad_(), y[:6].clone().requires_grad_(), n(0.9), n(0.1), n(0.3), -5, 7,
                        11, y[1:7].clone().requires_grad_(), n(0.4), y[2:8].clone().requires_grad_(), n(-0.2),
                        backend),
        "affine_step_out": (x, y[:6], n(0.9), n(0.1), n(0.3), 4, 7, 11, y[1:7], n(0.4), None, n(0.0), backend,
                            torch.empty_like(x)),
        "affine_step_no_history": (x.clone().requires_grad_(), y[:6].clone().requires_grad_(), n(0.9), n(0.1),
                                   n(0.3), -5, 7, 11, None, n(0.0), None, n(0.0), backend),
        "pointcloud_step": (x.clone().requires_grad_(), y, n(0.8), n(0.5), n(0.9), n(0.1), n(0.3), 4, 7, 11, lw,
                            n(0.0), backend),
        "pointcloud_step_out": (x, y, n(0.8), n(0.5), n(0.9), n(0.1), n(0.3), 4, 7, 11, None, n(0.0), backend,
                                torch.empty_like(x)),
        "pointcloud_sample": (x.clone(), y, table, 4, 11, lw, n(0.0), True, backend),
        "posterior_vjp": (*cloud, lw, n(0.2), torch.randn_like(x), torch.randn(x.shape[0], dtype=F64)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["posterior", "affine_step", "affine_step_out", "affine_step_no_history",
                                  "pointcloud_step", "pointcloud_step_out", "pointcloud_sample", "posterior_vjp"])
def test_opcheck(name, backend):
    """Schema (declared mutations only), fake tensors (same metadata as the real op), autograd registration, and
    AOT dispatch with static and dynamic shapes (same results as eager)."""
    op = name.removesuffix("_no_history")
    torch.library.opcheck(getattr(torch.ops.fastdiff, op), _opcheck_cases(backend)[name])


def test_op_equals_the_public_function_bit_for_bit():
    """torch.ops.fastdiff.* in eager mode is fastdiff.ops.* (the op's implementation calls it)."""
    x, y = _cloud(dtype=F32)
    n = lambda v: torch.scalar_tensor(v, dtype=F64)  # noqa: E731
    D, L = ops.posterior(x, y, 0.8, 0.6)
    D2, L2 = torch.ops.fastdiff.posterior(x, y, n(0.8), n(0.6), None, n(0.0), "auto")
    assert torch.equal(D, D2) and torch.equal(L, L2)
    assert torch.equal(ops.affine_step(x, D, 0.9, 0.1, 0.3, SEED, 3, 5),
                       torch.ops.fastdiff.affine_step(x, D, n(0.9), n(0.1), n(0.3), SEED - 2**64, 3, 5, None, n(0.0),
                                                      None, n(0.0), "auto"))
    D1, D2 = torch.randn_like(D), torch.randn_like(D)
    assert torch.equal(ops.affine_step(x, D, 0.9, 0.1, 0.3, SEED, 3, 5, history=((0.4, D1), (-0.2, D2))),
                       torch.ops.fastdiff.affine_step(x, D, n(0.9), n(0.1), n(0.3), SEED - 2**64, 3, 5, D1, n(0.4),
                                                      D2, n(-0.2), "auto"))


# ------------------------------------------------------------------ user loops under torch.compile(fullgraph=True)
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))


def _mlp_step(model):
    def step(x, sigma, A, B, C, k, offset):
        D = model(torch.cat([x, torch.ones_like(x[:, :1]) * sigma], 1))
        return ops.affine_step(x, D, A, B, C, SEED, k, offset)
    return step


def test_mlp_step_loop_recompiles_once_only_and_gives_eager_bits():
    """A per-step compiled function: changing numbers (σ, A, B, C) and counters (step, sample_offset) are symbolic
    after the first step; dynamo compiles once more (its automatic-dynamic pass) and never again."""
    step = _mlp_step(_mlp())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x = xe = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    frames = []
    with torch.no_grad():
        for k, t in enumerate(_table(8)):
            args = (t["sigma"], t["A"], t["B"], t["C"], k, 100 + 64 * k)
            x, xe = compiled(x, *args), step(xe, *args)
            assert torch.equal(x, xe), k
            frames.append(counter.frame_count)
    assert frames == [1] + [2] * 7


def test_mlp_loop_with_inductor_gives_eager_bits_with_in_place_steps():
    """The whole loop in one graph, through inductor, the update in place (out=x): the same bits as eager."""
    model, table = _mlp(), _table(4)

    def loop(x):
        for k, t in enumerate(table):
            D = model(torch.cat([x, torch.ones_like(x[:, :1]) * t["sigma"]], 1))
            ops.affine_step(x, D, t["A"], t["B"], t["C"], SEED, k, 7, out=x)
        return x

    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = torch.compile(loop, fullgraph=True)(x0.clone())
        want = loop(x0.clone())
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pointcloud_posterior_step_loop(dtype):
    """A user step on a point cloud: D and L from ops.posterior, a hand-written update, and the fused
    ops.pointcloud_step in place; per-step α, σ and counters change without recompiling."""
    x0, y = _cloud(M=16, N=40, d=2, dtype=dtype)

    def step(x, alpha, sigma, A, B, C, k):
        D, L = ops.posterior(x, y, alpha, sigma)
        x = A * x + B * D
        ops.pointcloud_step(x, y, alpha, sigma, A, B, C, SEED, k, 3, out=x)
        return x, L

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x = xe = x0
    for k, t in enumerate(_table(6)):
        args = (t["alpha"], t["sigma"], t["A"], t["B"], t["C"], k)
        (x, L), (xe, Le) = compiled(x, *args), step(xe, *args)
        assert torch.equal(x, xe) and torch.equal(L, Le), k
    assert counter.frame_count == 2


def test_gradients_through_compiled_ops_equal_eager():
    """Autograd under compile uses the eager backward (float64, from the inputs): same bits."""
    x0, y = _cloud(M=5, N=8, d=3)
    alpha = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9], dtype=F64)

    def loss(x):
        D, L = ops.posterior(x, y, alpha, 0.6, bandwidth=0.1)
        x1 = ops.pointcloud_step(x, y, 0.7, 0.5, 0.9, 0.2, 0.3, 1, 2)
        x2 = ops.affine_step(x1, D, 0.8, 0.3, 0.1, 1, 3)
        return (x2 * torch.arange(3.0, dtype=F64)).sum() + L.sum()

    grads = []
    for f in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        x = x0.clone().requires_grad_()
        grads.append(torch.autograd.grad(f(x), x)[0])
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().min() > 0


def test_pointcloud_sample_compiled_updates_x_in_place():
    x0, y = _cloud(M=10, N=12, d=2, dtype=F32)
    table = _table(5)
    kernel_table = pack_table(*([t[k] for t in table] for k in ("alpha", "sigma", "A", "B", "C")))

    def sample(x):
        return ops.pointcloud_sample(x, y, kernel_table, SEED, 9, return_trajectory=True)

    x, xe = x0.clone(), x0.clone()
    traj = torch.compile(sample, fullgraph=True, backend="aot_eager")(x)
    traj_e = sample(xe)
    assert torch.equal(x, xe) and torch.equal(traj, traj_e) and not torch.equal(x, x0)


# ------------------------------------------------------------------ the contract holds under compile
def test_value_errors_raise_at_run_time_and_leave_x_untouched():
    """The NaN scan runs inside the op: the compiled graph raises the eager ValueError, and the in-place update
    leaves the caller's x as it was."""
    x, y = _cloud(dtype=F32)
    D = torch.randn_like(x)
    D[2, 1] = float("nan")
    before = x.clone()
    f = torch.compile(lambda x, D: ops.affine_step(x, D, 0.9, 0.1, 0.3, 1, 2, out=x), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(ValueError, match="D contains NaN or inf"):
        f(x, D)
    assert torch.equal(x, before)


def test_metadata_errors_raise_at_trace_time():
    """Shapes, devices and requires_grad are checked while tracing: the eager ValueError without fullgraph; with
    fullgraph=True dynamo reports a user exception as Unsupported, which quotes the ValueError."""
    x, y = _cloud()

    def post(x, y):
        return ops.posterior(x, y, 0.8, 0.6)

    def step(x, k):
        return ops.affine_step(x, x, 0.9, 0.1, 0.3, 1, k)

    cases = [(post, (x, y.clone().requires_grad_()), "data requires grad, but gradients flow to x only"),
             (post, (x, y[:, :2]), "x has d=3 columns but data has d=2"),
             (step, (x, -1), r"step must be an integer in \[0, 4294967296\)")]
    for f, args, message in cases:
        torch._dynamo.reset()   # (a frame that raised while tracing is not traced again)
        with pytest.raises(torch._dynamo.exc.Unsupported, match=f"ValueError\\('{message}"):
            torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=message):
            torch.compile(f, backend="aot_eager")(*args)


# ------------------------------------------------------------------ the multistep history under compile (issue 14)
def test_multistep_mlp_step_with_history_recompiles_once_only_and_gives_eager_bits():
    """A dpmpp_2m-like user step: ops.affine_step with history ((B1, D_{k−1}), (B2, D_{k−2})) in place; the
    history coefficients change per step without recompiling (after dynamo's one automatic-dynamic pass), the
    history buffers rotate outside the compiled function, and every step equals eager bit for bit."""
    model = _mlp()

    def step(x, D1, D2, sigma, A, B, C, B1, B2, k):
        D = model(torch.cat([x, torch.ones_like(x[:, :1]) * sigma], 1))
        ops.affine_step(x, D, A, B, C, SEED, k, 5, out=x, history=((B1, D1), (B2, D2)))
        return D

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x0 = torch.randn(48, 2, generator=torch.Generator().manual_seed(4))
    runs = []
    for fn in (compiled, step):
        x, D1, D2 = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
        states = []
        with torch.no_grad():
            for k, t in enumerate(_table(6)):
                D = fn(x, D1, D2, t["sigma"], t["A"], t["B"], t["C"], 0.1 + 0.02 * k, -0.05 + 0.01 * k, k)
                D1, D2 = D, D1
                states.append(x.clone())
        runs.append(states)
    for k, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a, b), k
    assert not torch.equal(runs[0][-1], x0)
    assert counter.frame_count == 2


def test_history_errors_raise_at_trace_time():
    """A history D of the wrong shape is refused while tracing, naming it."""
    x, _ = _cloud()

    def step(x, D1):
        return ops.affine_step(x, x, 0.9, 0.1, 0.3, 1, 2, history=((0.5, D1),))

    with pytest.raises(ValueError, match=r"history\[0\] D must have shape \(6, 3\)"):
        torch.compile(step, backend="aot_eager")(x, x[:, :2])


@pytest.mark.parametrize("np_int", ["int16", "int32", "uint32", "int64"])
def test_numpy_integer_counters_compile(np_int):
    """Counters may be numpy integers (the README): traced, dynamo makes them 0-d tensors, whose range is asserted
    at run time instead of compared. (A numpy uint64 fails inside dynamo itself, in torch 2.14.)"""
    import numpy as np
    typ = getattr(np, np_int)
    x, D = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    eager = [ops.affine_step(x, D, 0.9, 0.1, 0.3, 7, k, 3) for k in range(3)]

    def step(x, D, seed, k, sample_offset):
        return ops.affine_step(x, D, 0.9, 0.1, 0.3, seed, k, sample_offset)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = [compiled(x, D, typ(7), k, typ(3)) for k in np.arange(3, dtype=np_int)]
    assert all(torch.equal(a, b) for a, b in zip(got, eager, strict=True))

    def loop(x, D):                         # numpy counters from the caller's scope, a numpy range inside
        return [ops.affine_step(x, D, 0.9, 0.1, 0.3, seed, k, offset) for k in np.arange(3)]
    seed, offset = typ(7), typ(3)
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True, backend="aot_eager")(x, D)
    assert all(torch.equal(a, b) for a, b in zip(got, eager, strict=True))
