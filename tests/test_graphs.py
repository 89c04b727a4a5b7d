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


def _uncaptured_loop(calls):
    """fastdiff._graphs.run_chunk without the capture: its warm-up steps and then the body the graph records
    (fastdiff._graphs.loop), on the caller's device, recording each call's History."""
    from fastdiff.triton.affine_step import noise_counters

    def run_chunk(denoiser, xc, t_list, A, B, C, seed, sample_offset, want_traj, hist=None):
        calls.append((C, hist))
        counters = noise_counters(seed, sample_offset, xc.device)
        x = xc.clone()
        traj = torch.empty((len(t_list) + 1, *x.shape), dtype=x.dtype) if want_traj else None
        _graphs.loop(x, traj, denoiser, t_list, A, B, C, counters, hist)
        return x, traj
    return run_chunk


@pytest.mark.parametrize("method, prediction, depth", [("dpmpp_2m", "eps", 1), ("dpmpp_3m_sde", "x0", 2),
                                                       ("dpmpp_2m_sde", "score", 1), ("euler_ancestral", "eps", 0)])
def test_captured_multistep_loop_equals_the_eager_loop(method, prediction, depth, monkeypatch):
    """cuda_graph=True with a multistep method: the loop the graph captures (fastdiff._graphs.loop: the model's
    output turned into D_k in one of depth + 1 rotating buffers, the Triton affine step with B1 D_{k−1}, B2 D_{k−2}
    and device noise counters), run uncaptured on the CPU under the Triton interpreter, equals the eager model loop
    on the triton backend bit for bit at every state, over chunks with offsets. The warm-up steps cover every
    kernel variant the loop launches, so nothing compiles while capturing. (The capture itself: the gpu tests.)"""
    calls: list = []
    monkeypatch.setattr(_graphs, "refuse_reasons", lambda device, dtype: [])
    monkeypatch.setattr(_graphs, "run_chunk", _uncaptured_loop(calls))
    den = fd.from_model(_mlp("cpu"), fd.VP(), prediction, event_shape=(2,))
    kw = dict(n=37, steps=9, method=method, schedule="karras", seed=3, sample_offset=11, chunk_size=20,
              return_trajectory=True)
    eager = fd.sample(den, backend="triton", **kw)
    graph = fd.sample(den, cuda_graph=True, **kw)
    assert len(calls) == 2 and all(h is not None and h.depth == depth for _, h in calls)
    assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])
    C, hist = calls[0]

    def variant(k):
        return C[k] == 0.0, hist.B1[k] != 0.0, hist.B2[k] != 0.0
    assert {variant(k) for k in _graphs._warm_steps(C, hist)} == {variant(k) for k in range(len(C))}


def test_cuda_graph_refuses_the_methods_of_the_table_executor(monkeypatch):
    """Two-stage methods, churn and lms have no captured loop: cuda_graph=True says so (naming the method and
    why) instead of running uncaptured."""
    monkeypatch.setattr(_graphs, "refuse_reasons", lambda device, dtype: [])
    den = fd.from_model(_mlp("cpu"), fd.VP(), event_shape=(2,))
    for method, options, why in (("heun", {}, "two-stage"), ("edm_euler", {"s_churn": 1.0, "s_tmax": 5.0}, "churn"),
                                 ("lms", {}, "lms keeps")):
        with pytest.raises(ValueError, match=f"cuda_graph=True: method '{method}' runs the torch table executor.*"
                                             f"{why}"):
            fd.sample(den, n=4, steps=5, method=method, cuda_graph=True, **options)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method, prediction", [("dpmpp_2m", "eps"), ("dpmpp_3m_sde", "x0")])
def test_graph_replay_of_a_multistep_method_equals_the_eager_loop(method, prediction):
    """The captured multistep loop on the GPU: equal to the eager loop on the triton backend, over two chunk
    shapes, and replayed for a second seed."""
    _graphs.clear_cache()
    den = fd.from_model(_mlp("cuda"), fd.VP(), prediction, event_shape=(2,))
    kw = dict(steps=20, method=method, schedule="karras", device="cuda", chunk_size=300)
    for seed, offset in ((1, 0), (7, 5000)):
        eager = fd.sample(den, n=700, seed=seed, sample_offset=offset, backend="triton", **kw)
        graph = fd.sample(den, n=700, seed=seed, sample_offset=offset, cuda_graph=True, **kw)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(_graphs._CACHE) == 2
