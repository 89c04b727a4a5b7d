"""fastdiff._C.value_ends, the compiled value scan of the ops' input checks, against torch.aminmax: the same
(min, max) for every float32/float64 layout the checks hand it, NaN at both ends wherever a NaN sits (first, last,
inside a vector's tail, across the thread chunks of 2**16 elements), and ±inf reported as an end."""
import math

import pytest
import torch

from fastdiff import _checks

C = pytest.importorskip("fastdiff._C")

SIZES = (1, 15, 16, 17, 1000, (1 << 16) - 1, (1 << 16) + 1, 3 * (1 << 16) + 5)


def aminmax(t):
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def same(a, b):
    return all((math.isnan(u) and math.isnan(v)) or u == v for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("n", SIZES)
def test_ends_match_aminmax(dtype, n):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g, dtype=torch.float64).mul_(1e3).to(dtype)
    assert C.value_ends([t]) == [aminmax(t)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("n", (17, (1 << 16) + 1, 3 * (1 << 16) + 5))
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_nonfinite_anywhere(dtype, n, bad):
    base = torch.linspace(-2.0, 3.0, n, dtype=dtype)
    for at in (0, n - 1, n // 2, (1 << 16) - 1 if n > 1 << 16 else 16, n - 2):
        t = base.clone()
        t[at] = bad
        got = C.value_ends([t])[0]
        assert same(got, aminmax(t)), (at, got)
        if math.isnan(bad):
            assert math.isnan(got[0]) and math.isnan(got[1])


def test_several_tensors_one_call():
    a = torch.randn(33, 7)
    b = torch.randn(5, dtype=torch.float64).abs_() + 4.0
    assert C.value_ends([a, b]) == [aminmax(a), aminmax(b)]


@pytest.mark.parametrize("t", (torch.empty(0), torch.randn(4, 4).t(), torch.randn(8).half()),
                         ids=("empty", "strided", "half"))
def test_refuses_what_the_checks_never_send(t):
    with pytest.raises(RuntimeError, match="tensor 0 must be a non-empty contiguous float32 or float64 CPU tensor"):
        C.value_ends([t])


@pytest.mark.parametrize("x", (torch.randn(40, 3).t(), torch.randn(6, 5).to(torch.bfloat16), torch.randn(9, 2)),
                         ids=("strided", "bf16", "contiguous"))
def test_minmax_same_either_way(x):
    """_checks.minmax takes the compiled scan for contiguous float32/64 CPU tensors and torch.aminmax otherwise:
    the same numbers, and None for an empty tensor."""
    got = _checks.minmax(x=x, e=torch.empty(0), n=None)
    assert got["x"] == aminmax(x.float()) and got["e"] is None and got["n"] is None
