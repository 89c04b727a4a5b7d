"""Cross-checks with k-diffusion (MATH.md §3): with PureVE (σ = t), the ODE `euler` run is exactly
k-diffusion's `sample_euler` and the SDE `ei-x0` run its `sample_euler_ancestral`, given the same noise.
Runs when k-diffusion is installed."""
import importlib
import importlib.util
import sys
import types

import pytest
import torch

import fastdiff as fd


def _kdiffusion_sampling():
    if "k_diffusion.sampling" in sys.modules:      # loaded already (possibly through the stand-in package below,
        return sys.modules["k_diffusion.sampling"]  # which has no __spec__ for find_spec to read)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install k-diffusion)")
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        # k_diffusion/__init__ imports its whole training stack (wandb, CLIP, ...); the samplers need
        # only k_diffusion.sampling and k_diffusion.utils, so load those without the package __init__.
        for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
            del sys.modules[name]
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        try:
            return importlib.import_module("k_diffusion.sampling")
        except ImportError as exc:
            pytest.skip(f"k_diffusion.sampling cannot be imported here: {exc}")


@pytest.fixture(scope="module")
def setup():
    K = _kdiffusion_sampling()
    p = fd.PureVE(T=40.0)
    cloud = fd.PointCloud(fd.datasets.swiss_roll(200, seed=1, dtype=torch.float64), p, bandwidth=0.01)
    times = fd.time_grid(p, 25, "karras", 0.01)
    x_T = p.prior(300, 2, seed=7, dtype=torch.float64)

    def model(x, sigma):
        return cloud.denoise(x, float(sigma[0]))          # σ = t for PureVE
    return K, p, cloud, times, x_T, model


def test_ode_euler_is_k_diffusion_sample_euler(setup):
    K, p, cloud, times, x_T, model = setup
    ours = fd.sample(cloud, x=x_T.clone(), times=times, method="euler", ode=True)
    theirs = K.sample_euler(model, x_T.clone(), times.clone(), disable=True)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10)


def test_sde_ei_x0_is_k_diffusion_sample_euler_ancestral(setup):
    K, p, cloud, times, x_T, model = setup
    step = iter(range(len(times)))
    idx = torch.arange(x_T.shape[0])

    def noise_sampler(sigma, sigma_next):
        return fd.noise.normal(11, idx, next(step), 2, dtype=torch.float64)
    ours = fd.sample(cloud, x=x_T.clone(), times=times, method="ei-x0", seed=11)
    theirs = K.sample_euler_ancestral(model, x_T.clone(), times.clone(), disable=True, noise_sampler=noise_sampler)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    # and the noise really mattered: a different seed gives different samples
    assert not torch.allclose(fd.sample(cloud, x=x_T.clone(), times=times, method="ei-x0", seed=12), theirs, atol=1e-3)
