"""Time grids (MATH.md §4): end points, monotonicity and the defining uniformity of each schedule."""
import math

import pytest
import torch

import fastdiff as fd


@pytest.mark.parametrize("schedule", fd.SCHEDULES)
def test_grid_shape_ends_and_order(process, schedule):
    t = fd.time_grid(process, 17, schedule, t_end=1e-3 * process.T)
    assert t.dtype == torch.float64 and t.shape == (18,)
    assert float(t[0]) == process.T and float(t[-1]) == pytest.approx(1e-3 * process.T, rel=1e-15)
    assert bool((t[1:] < t[:-1]).all())


def _is_uniform(v):
    d = v[1:] - v[:-1]
    return torch.allclose(d, d.mean().expand_as(d), rtol=1e-9, atol=1e-12)


def test_each_schedule_is_uniform_in_its_variable():
    p = fd.OU(theta=0.5, g=1.0, T=10.0)
    K, delta = 12, 1e-4
    assert _is_uniform(fd.time_grid(p, K, "uniform", delta))
    q = fd.time_grid(p, K, "quadratic", delta)
    assert _is_uniform(torch.sqrt(q - delta))
    assert _is_uniform(torch.log(fd.time_grid(p, K, "exponential", delta)))
    assert _is_uniform(p.sigma(fd.time_grid(p, K, "karras", delta)) ** (1 / 7))
    assert _is_uniform(p.log_snr(fd.time_grid(p, K, "logsnr", delta)))


def test_cem_exponential_grid_with_a_final_step_to_zero():
    p = fd.OU(theta=0.5, g=1.0, T=10.0)
    t = fd.time_grid(p, 200, "exponential", 1e-4, append_zero=True)
    assert t.shape == (202,) and float(t[-2]) == pytest.approx(1e-4) and float(t[-1]) == 0.0
    assert float(t[1]) == pytest.approx(math.exp(math.log(10) - (math.log(10) - math.log(1e-4)) / 200))


def test_karras_on_pure_ve_is_the_edm_grid():
    p = fd.PureVE(T=80.0)
    t = fd.time_grid(p, 10, "karras", 0.002)
    ramp = torch.linspace(0, 1, 11, dtype=torch.float64)
    edm = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(t, edm, rtol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(schedule="cosine"), "schedule"),
    (dict(t_end=0.0), "t_end"), (dict(t_end=20.0), "t_end"), (dict(t_end=float("nan")), "t_end"),
])
def test_bad_grid_arguments(kwargs, match):
    p = fd.OU()
    with pytest.raises(ValueError, match=match):
        fd.time_grid(p, **(dict(steps=10) | kwargs))


@pytest.mark.parametrize("times, match", [
    ([5.0, 5.0, 1.0], "strictly decreasing"), ([1.0, 2.0], "strictly decreasing"), ([11.0, 1.0], "exceeds"),
    ([5.0, 0.0, -1.0], "strictly decreasing|positive"), ([5.0, 0.0, 0.0], "strictly decreasing"),
    ([3.0], "at least 2"), ([[3.0, 1.0]], "1-D"), ([3.0, float("nan")], "NaN"), ([3.0, 0.0, -1.0], "positive"),
])
def test_explicit_grids_are_validated(times, match):
    with pytest.raises(ValueError, match=match):
        fd.check_times(fd.OU(T=10.0), torch.tensor(times))


def test_grids_float64_cannot_resolve_are_named():
    for process, schedule, t_end in ((fd.DriftedVE(T=100.0, beta="t^2"), "karras", 99.9),
                                     (fd.PureVE(T=100.0), "logsnr", 1e-300)):
        with pytest.raises(ValueError, match=f"schedule '{schedule}' with t_end=.* cannot be resolved in float64"):
            fd.time_grid(process, 100 if schedule == "logsnr" else 10, schedule, t_end)
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        fd.time_grid(fd.VP(), 10, "karras", rho=math.inf)
    with pytest.raises(TypeError, match="rho must be a number"):
        fd.time_grid(fd.VP(), 10, "karras", rho="7")
    with pytest.raises(TypeError, match="t_end must be a number"):
        fd.time_grid(fd.VP(), 10, t_end="1e-3")


@pytest.mark.parametrize("bad", [[True, False], torch.tensor([True, False]), ["1.0", "0.5"], "1.0",
                                 torch.tensor([1.0, 0.5], dtype=torch.complex64)])
def test_time_grids_must_be_real_numbers(bad):
    """A bool grid read as [1, 0] and a complex one with its imaginary part dropped used to run; strings failed
    inside torch without naming times."""
    with pytest.raises(TypeError, match="^times must be"):
        fd.check_times(fd.VP(), bad)


def test_unresolvable_grid_names_the_cause_of_its_schedule():
    """uniform, quadratic and exponential never evaluate σ: their error says the steps fall below float64's
    spacing (it blamed σ saturating)."""
    for schedule in ("uniform", "quadratic", "exponential"):
        with pytest.raises(ValueError, match="fall below float64's spacing"):
            fd.time_grid(fd.OU(), 10, schedule, t_end=9.999999999999998)
