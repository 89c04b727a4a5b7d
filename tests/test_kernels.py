"""What is specific to the compiled kernels fastdiff._C (`cpu` on CPU tensors here, `cuda` on a GPU): the glue's
own argument and table checks, the CUDA d limit, auto's choice on the CPU, and the Gaussian oracle through the
kernels at 20000 samples. The checks every backend shares are in tests/test_<op>.py (tests/contract.py)."""
import math

import pytest
import torch

import fastdiff as fd
from fastdiff import _backend, _table, ops

F64 = torch.float64


def _backends():
    out = []
    for name, device, marks in (("cpu", "cpu", ()), ("cuda", "cuda", (pytest.mark.gpu,))):
        reasons = _backend.BACKENDS[name].unavailable_reasons()
        if name == "cuda" and not torch.cuda.is_available():
            reasons = reasons + ["no CUDA device"]
        marks = marks + ((pytest.mark.skip(reason="; ".join(reasons)),) if reasons else ())
        out.append(pytest.param(name, device, id=name, marks=marks))
    return out


BACKENDS = _backends()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("method", fd.METHODS)
def test_gaussian_oracle_holds_through_the_kernels(backend, device, method):
    """A wide Gaussian point cloud is (nearly) Gaussian data; the oracle of its empirical law must match."""
    p = fd.OU(theta=0.5, g=1.0, T=10.0)
    g = torch.Generator().manual_seed(15)
    data = torch.randn(4000, 2, generator=g, dtype=F64) @ torch.tensor([[1.0, 0.0], [0.6, 0.7]], dtype=F64)
    mean, cov = data.mean(0), torch.cov(data.T, correction=0)
    times = fd.time_grid(p, 6, "exponential", 0.3)        # stop where the cloud's law ≈ its Gaussian
    cloud = fd.PointCloud(data.to(device), p, bandwidth=0.0)
    x = fd.sample(cloud, n=20000, times=times, method=method, seed=4, dtype=F64, backend=backend).cpu()
    mu, S = fd.gaussian_oracle(p, times, method, False, mean, cov)
    n = x.shape[0]
    assert bool(((x.mean(0) - mu).abs() <= 5 * torch.sqrt(S.diag() / n) + 0.01).all())
    assert bool(((torch.cov(x.T) - S).abs() <= 5 * torch.sqrt(2 * S.diag()[:, None] * S.diag()[None] / n) + 0.02).all())


def test_compiled_backend_is_used_by_auto_on_cpu():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    chosen = _backend.select("pointcloud_sample", "auto", device=torch.device("cpu"), dtype=torch.float32, d=2)
    assert chosen.name == "cpu"


def test_bad_inputs_name_the_argument():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    C = _backend.extension()
    x, y = torch.randn(3, 2), torch.randn(5, 2)
    one = torch.ones((), dtype=F64)
    with pytest.raises(RuntimeError, match="x must have shape"):
        C.posterior(torch.randn(3), y, one, one)
    with pytest.raises(RuntimeError, match="d=2 columns but data has d=3"):
        C.posterior(x, torch.randn(5, 3), one, one)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.posterior(x.half(), y, one, one)
    with pytest.raises(RuntimeError, match="alpha must be a scalar or have shape"):
        C.posterior(x, y, torch.ones(2, dtype=F64), one)
    with pytest.raises(RuntimeError, match="log_weights must have shape"):
        C.posterior(x, y, one, one, torch.zeros(4))
    with pytest.raises(RuntimeError, match="data must contain at least one point"):
        C.posterior(x, torch.randn(0, 2), one, one)
    with pytest.raises(RuntimeError, match="D must have the shape of x"):
        C.affine_step(x, torch.randn(3, 3), 1.0, 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="out must match x"):
        C.affine_step(x, x, 1.0, 1.0, 1.0, 0, 0, 0, torch.empty(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        ops.posterior(x, y, 1.0, 0.0, backend="cpu")
    with pytest.raises(ValueError, match="device"):
        ops.posterior(x, y.to("meta"), 1.0, 1.0, backend="cpu")


# ---------------------------------------------------------------- fastdiff._C.pointcloud_sample: the step table
def _compiled():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    return _backend.extension()


def test_pointcloud_sample_checks_the_table_and_leaves_x_untouched_on_error():
    C = _compiled()
    x, y = torch.randn(3, 2), torch.randn(5, 2)
    good = _table.pack([0.9, 0.8], [0.5, 0.4], [1.0, 1.0], [0.1, 0.1], [0.2, 0.2])
    bad = {
        r"table must have shape \[K, 17\]": (ValueError, good[:, :7].contiguous()),
        r"table must have shape \[K, 17\].*got \[34\]": (ValueError, good.reshape(-1)),
        "table must be float64, got Float": (TypeError, good.float()),
        "table must be a CPU tensor.*meta": (ValueError, good.to("meta")),
        "table must be contiguous": (ValueError, good.t().contiguous().t()),
    }
    for match, (err, table) in bad.items():
        xc = x.clone()
        with pytest.raises(err, match=match):
            C.pointcloud_sample(xc, y, table, 0, 0, None, 0.0, True)
        assert torch.equal(xc, x)


@pytest.mark.parametrize("row, col", [(0, "B1"), (0, "B2"), (1, "B2")])
@pytest.mark.parametrize("value", [0.25, -1e-300, math.nan])
def test_pointcloud_sample_refuses_history_from_before_the_first_row(row, col, value):
    """The cpu glue runs the multistep columns B1/B2 with the D's of earlier rows; a first row that would use
    D_{-1} or D_{-2} (which do not exist) is an error, never run on unset history, and x is untouched."""
    C = _compiled()
    x, y = torch.randn(4, 3, generator=_gen(26)), torch.randn(6, 3, generator=_gen(27))
    table = _table.pack([0.9, 0.8, 0.7], [0.5, 0.4, 0.3], [1.0, 0.99, 0.98], 0.1, 0.2)
    table[row, _table.COLUMNS.index(col)] = value
    xc = x.clone()
    with pytest.raises(ValueError, match=f"table row {row} uses a D from before the first step"):
        C.pointcloud_sample(xc, y, table, 0, 0)
    assert torch.equal(xc, x)


@pytest.mark.gpu
def test_cuda_glue_refuses_d_past_cuda_max_d():
    """d = build_config()["cuda_max_d"] + 1 is refused by the glue of every point-cloud op, naming d; x untouched."""
    if not torch.cuda.is_available() or _backend.BACKENDS["cuda"].unavailable_reasons():
        pytest.skip("needs the CUDA kernels and a GPU")
    C = _backend.extension()
    d = C.build_config()["cuda_max_d"] + 1
    x, y = torch.randn(2, d, device="cuda"), torch.randn(3, d, device="cuda")
    one = torch.ones(1, dtype=F64, device="cuda")
    xc = x.clone()
    with pytest.raises(ValueError, match=f"posterior: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.posterior(x, y, one, one)
    with pytest.raises(ValueError, match=f"pointcloud_step: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.pointcloud_step(x, y, one, one, 1.0, 0.5, 0.1, 0, 0, 0, None, 0.0, x)
    with pytest.raises(ValueError, match=f"pointcloud_sample: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.pointcloud_sample(x, y, _table.pack(0.9, 0.5, 1.0, 0.1, 0.2), 0, 0)
    assert torch.equal(x, xc)

