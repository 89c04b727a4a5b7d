"""fd.sample(..., cuda_graph=True): the captured loop of a user network. Without a GPU only the refusals
run; on a GPU (tests marked `gpu`) the replayed graph must equal the eager loop with the same kernels,
reuse its capture across seeds and offsets, and record trajectories."""
import pytest
import torch

import fastdiff as fd
from fastdiff import _graphs

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _mlp(device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 2)).to(device)

    def model(x, t):
        return net(torch.cat([x, t[:, None]], 1))
    return model


def test_cuda_graph_refusals_name_the_reason():
    den = fd.from_model(_mlp("cpu"), fd.VP(), event_shape=(2,))
    with pytest.raises(ValueError, match="CUDA"):
        fd.sample(den, n=8, steps=3, cuda_graph=True)
    with pytest.raises(ValueError, match="callback"):
        fd.sample(den, n=8, steps=3, cuda_graph=True, callback=lambda info: None)
    with pytest.raises(ValueError, match="float32"):
        fd.sample(den, n=8, steps=3, cuda_graph=True, dtype=torch.float64)
    assert _graphs.refuse_reasons(torch.device("cpu"), torch.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("ode", [False, True])
def test_graph_replay_equals_the_eager_loop_and_is_reused(ode):
    _graphs.clear_cache()
    den = fd.from_model(_mlp("cuda"), fd.VP(), event_shape=(2,))
    kw = dict(steps=20, schedule="quadratic", ode=ode, device="cuda", chunk_size=300)
    for seed, offset in ((1, 0), (7, 5000)):         # the second call replays the first call's graphs
        eager = fd.sample(den, n=700, seed=seed, sample_offset=offset, backend="triton", **kw)
        graph = fd.sample(den, n=700, seed=seed, sample_offset=offset, cuda_graph=True, **kw)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(_graphs._CACHE) == 2                   # chunks of 300 and of 100 rows
    one = fd.sample(den, n=1, seed=7, sample_offset=5299, cuda_graph=True, **kw)
    torch.testing.assert_close(one[0], graph[299], rtol=1e-5, atol=1e-5)   # batch invariance through graphs


@gpu
@pytest.mark.gpu
def test_graph_trajectory_and_gaussian_oracle():
    p = fd.VP(beta_min=0.1, beta_max=20.0)
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    var = torch.tensor([1.0, 0.3], dtype=torch.float64)
    cov = torch.diag(var)
    m32, v32 = mean.float().cuda(), var.float().cuda()

    def exact_x0(x, t):   # E[X0 | Xt = x] for N(mean, diag(var)) under VP, in plain tensor ops (graph-safe)
        alpha = torch.exp(-(0.1 * t / 2 + (20.0 - 0.1) * t * t / 4))[:, None]
        s2 = 1 - alpha * alpha
        return m32 + v32 * alpha / (alpha * alpha * v32 + s2) * (x - alpha * m32)
    den = fd.from_model(exact_x0, p, event_shape=(2,))
    times = fd.time_grid(p, 10, "quadratic", 1e-2)
    x, traj = fd.sample(den, n=200_000, times=times, method="ei", seed=2, device="cuda", cuda_graph=True,
                        return_trajectory=True)
    assert traj.shape == (11, 200_000, 2) and torch.equal(traj[-1], x)
    mu, S = fd.gaussian_oracle(p, times, "ei", False, mean, cov)
    xs = x.double().cpu()
    assert torch.allclose(xs.mean(0), mu, atol=5 * (S.diagonal().max() / 200_000) ** 0.5)
    assert torch.allclose(torch.cov(xs.T), S, atol=0.02)
