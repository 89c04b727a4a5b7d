"""fastdiff.k_diffusion against the real k_diffusion.sampling (installed by scripts/setup.sh): the same
signatures and callback dicts, and, given the same noise, the same results to 1e-12 relative in float64.

The model is the exact denoiser of a 3-component Gaussian mixture in 3-D under k-diffusion's σ = t (PureVE),
nonlinear in x, so every D evaluation matters. Noise for both comes from one deterministic noise sampler built
from fastdiff.noise and keyed by its (sigma, sigma_next) arguments (a pure function of them), so both libraries
get identical numbers wherever they draw; k-diffusion's churn noise (torch.randn_like) is patched to the same
numbers.
"""
import inspect
import math

import pytest
import torch

import fastdiff as fd
import fastdiff.k_diffusion as FK
from test_peers import _kdiffusion_sampling  # one loader: it skips k-diffusion's training stack

RTOL = 1e-12


@pytest.fixture(scope="module")
def K():
    return _kdiffusion_sampling()


PROC = fd.PureVE(T=1000.0)
GM = fd.GaussianMixture([0.5, 0.3, 0.2], [[1.0, -2.0, 0.5], [-1.5, 1.0, 2.0], [0.0, 3.0, -1.0]],
                        torch.stack([torch.eye(3) * 0.3, torch.diag(torch.tensor([0.5, 0.1, 0.2])),
                                     torch.eye(3) * 0.05]), PROC)


def model(x, sigma):
    return GM.denoise(x, sigma)


def x_T(sigma_max, n=6, seed=3):
    return sigma_max * fd.noise.normal(seed, range(n), 0, 3, dtype=torch.float64)


class KeyedNoise:
    """noise_sampler(sigma, sigma_next) → z, a pure function of its arguments: the grid index i of sigma and
    whether sigma_next is the grid's next entry (a step), a smaller value (a stage) or a larger one (churn)."""

    def __init__(self, sigmas, n, seed=17, dtype=torch.float64):
        self.sig = sigmas.double().tolist()
        self.n, self.seed, self.dtype = n, seed, dtype
        self.tol = 1e-9 if sigmas.dtype == torch.float64 else 1e-5       # sigma_fn(t_fn(σ)) is σ to rounding

    def index(self, sigma):
        s = float(sigma)
        i = min(range(len(self.sig)), key=lambda j: abs(self.sig[j] - s))
        assert abs(self.sig[i] - s) <= self.tol * s
        return i

    def draw(self, i, kind):
        return fd.noise.normal(self.seed, range(self.n), 4 * i + kind, 3, dtype=self.dtype)

    def __call__(self, sigma, sigma_next):
        i = self.index(sigma)
        nxt = float(sigma_next)
        if nxt > float(sigma):
            return self.draw(i, 2)                                         # churn
        if abs(nxt - self.sig[i + 1]) <= self.tol * max(nxt, 1e-300):
            return self.draw(i, 0)                                         # the step's noise
        return self.draw(i, 1)                                             # a stage's noise


def karras(n=12, sigma_min=0.02, sigma_max=80.0, zero=True):
    s = FK.get_sigmas_karras(n, sigma_min, sigma_max).double()
    return s if zero else s[:-1]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# (name, options): every sampler with its own settings
CASES = [
    ("sample_euler", {}),
    ("sample_euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("sample_heun", {}),
    ("sample_heun", {"s_churn": 5.0, "s_noise": 1.01}),
    ("sample_dpm_2", {}),
    ("sample_dpm_2", {"s_churn": 1.0, "s_tmin": 0.1}),
    ("sample_dpm_2_ancestral", {}),
    ("sample_dpm_2_ancestral", {"eta": 0.5}),
    ("sample_dpm_2_ancestral", {"eta": 1.2}),           # σ_down = 0 on the later steps
    ("sample_lms", {}),
    ("sample_lms", {"order": 2}),
    ("sample_dpmpp_2s_ancestral", {}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.3, "s_noise": 1.1}),
    ("sample_dpmpp_2s_ancestral", {"eta": 1.2}),
    ("sample_dpmpp_sde", {}),
    ("sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}),
    ("sample_dpmpp_sde", {"eta": 0.0}),
    ("sample_dpmpp_sde", {"eta": 1.7}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7, "s_noise": 0.8}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_3m_sde", {}),
    ("sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.2}),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}),
]


def _patched_randn_like(monkeypatch, noise):
    """k-diffusion's churn noise: one torch.randn_like(x) per step i, here the keyed noise (i, churn)."""
    calls = iter(range(10**6))
    monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: noise.draw(next(calls), 2).to(x.dtype))


@pytest.mark.parametrize("zero", [True, False], ids=["to_zero", "to_sigma_min"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n[7:]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_equals_k_diffusion(K, monkeypatch, name, options, zero):
    sigmas = karras(zero=zero)
    x = x_T(float(sigmas[0]))
    noisy = "noise_sampler" in inspect.signature(getattr(K, name)).parameters
    ns = KeyedNoise(sigmas, x.shape[0])
    kw = dict(options, noise_sampler=ns) if noisy else dict(options)
    ours_kw = dict(options, noise_sampler=ns) if noisy or "s_churn" in options else dict(options)
    ours = getattr(FK, name)(model, x.clone(), sigmas.clone(), disable=True, **ours_kw)
    with monkeypatch.context() as m:
        _patched_randn_like(m, ns)
        theirs = getattr(K, name)(model, x.clone(), sigmas.clone(), disable=True, **kw)
    assert torch.isfinite(theirs).all()
    assert rel_err(ours, theirs) <= RTOL
    assert rel_err(theirs, x) > 1e-3                  # the sampler really moved the state


def test_brownian_tree_noise_sampler_for_the_sde_samplers(K):
    """k-diffusion's default for dpmpp_sde / 2m_sde / 3m_sde: a BrownianTreeNoiseSampler. Passing the same
    one to both gives the same result (its value depends on the last bit of its arguments)."""
    sigmas = karras(10)
    x = x_T(float(sigmas[0]))
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    for name in ("sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        ours = getattr(FK, name)(model, x.clone(), sigmas, disable=True,
                                 noise_sampler=K.BrownianTreeNoiseSampler(x, lo, hi, seed=5))
        theirs = getattr(K, name)(model, x.clone(), sigmas, disable=True,
                                  noise_sampler=K.BrownianTreeNoiseSampler(x, lo, hi, seed=5))
        assert rel_err(ours, theirs) <= RTOL, name


def test_callback_dicts_match(K, monkeypatch):
    sigmas = karras(8)
    x = x_T(float(sigmas[0]))
    ns = KeyedNoise(sigmas, x.shape[0])
    for name, kw in (("sample_heun", {"s_churn": 3.0}), ("sample_dpmpp_2m", {}), ("sample_dpmpp_sde", {})):
        got = {"ours": [], "theirs": []}
        extra = {"noise_sampler": ns} if name != "sample_dpmpp_2m" else {}
        getattr(FK, name)(model, x.clone(), sigmas, disable=True, callback=got["ours"].append, **kw, **extra)
        with monkeypatch.context() as m:
            _patched_randn_like(m, ns)
            theirs_kw = dict(kw, **extra) if name == "sample_dpmpp_sde" else kw
            getattr(K, name)(model, x.clone(), sigmas, disable=True, callback=got["theirs"].append, **theirs_kw)
        assert len(got["ours"]) == len(got["theirs"]) == len(sigmas) - 1
        for a, b in zip(got["ours"], got["theirs"], strict=True):
            assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
            assert a["i"] == b["i"]
            assert float(a["sigma"]) == float(b["sigma"]) and float(a["sigma_hat"]) == float(b["sigma_hat"])
            assert rel_err(a["x"], b["x"]) <= RTOL and rel_err(a["denoised"], b["denoised"]) <= RTOL


def test_signatures_extend_k_diffusion(K):
    """k-diffusion's parameters, in order with the same defaults; fastdiff's extras only keyword-only."""
    for name in FK.__all__:
        if not name.startswith("sample_"):
            continue
        theirs = list(inspect.signature(getattr(K, name)).parameters.values())
        ours = list(inspect.signature(getattr(FK, name)).parameters.values())
        assert [(p.name, p.default, p.kind) for p in ours[: len(theirs)]] == \
               [(p.name, p.default, p.kind) for p in theirs], name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):]), name


def test_grid_helpers_match(K):
    for name, args in (("get_sigmas_karras", (10, 0.03, 14.6)), ("get_sigmas_exponential", (10, 0.03, 14.6)),
                       ("get_sigmas_polyexponential", (10, 0.03, 14.6, 2.0)), ("get_sigmas_vp", (10,))):
        assert torch.equal(getattr(FK, name)(*args), getattr(K, name)(*args)), name


@pytest.mark.parametrize("name", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_one_step_grid_to_zero(K, name):
    """k-diffusion raises UnboundLocalError here; the answer is D(x, σ_0)."""
    sigmas = torch.tensor([3.0, 0.0], dtype=torch.float64)
    x = x_T(3.0)
    with pytest.raises(UnboundLocalError):
        getattr(K, name)(model, x.clone(), sigmas, disable=True)
    assert torch.equal(getattr(FK, name)(model, x.clone(), sigmas, disable=True, seed=1),
                       model(x, torch.full((6,), 3.0)))


@pytest.mark.parametrize("name", ["sample_euler", "sample_dpmpp_2m", "sample_dpmpp_3m_sde", "sample_heun"])
def test_no_steps_and_empty_batches_as_k_diffusion(K, name):
    """A one-entry grid has no steps: k-diffusion returns x as given, and so does fastdiff. An empty batch
    gives an empty result, with the model and the callback called as often as k-diffusion calls them (a hook
    that counts steps sees the same run)."""
    x = x_T(3.0)
    one = torch.tensor([3.0], dtype=torch.float64)
    assert getattr(K, name)(model, x, one, disable=True) is x
    assert getattr(FK, name)(model, x, one, disable=True) is x
    empty = torch.zeros(0, 3, dtype=torch.float64)
    counts = {}

    def counted(lib):
        def m(x, s):
            counts[lib, "model"] = counts.get((lib, "model"), 0) + 1
            return model(x, s)
        return m, lambda d: counts.__setitem__((lib, "callback"), counts.get((lib, "callback"), 0) + 1)
    m, cb = counted("k")
    want = getattr(K, name)(m, empty.clone(), karras(4), disable=True, callback=cb)
    m, cb = counted("f")
    got = getattr(FK, name)(m, empty, karras(4), disable=True, callback=cb)
    assert got.shape == want.shape == (0, 3) and got.dtype == want.dtype
    assert counts["f", "model"] == counts["k", "model"] > 0
    assert counts["f", "callback"] == counts["k", "callback"] > 0
    with pytest.raises(ValueError, match="order"):                    # and the options are still checked
        FK.sample_lms(model, empty, karras(4), disable=True, order=0)
    with pytest.raises(ValueError, match="strictly decreasing"):      # the grid is still checked
        getattr(FK, name)(model, empty, karras(4).flip(0), disable=True)


def test_default_noise_is_batch_invariant_and_seeded():
    sigmas = karras(10)
    x = x_T(float(sigmas[0]), n=8)
    for name in ("sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_dpmpp_sde", "sample_dpmpp_3m_sde"):
        full = getattr(FK, name)(model, x.clone(), sigmas, disable=True, seed=9)
        part = getattr(FK, name)(model, x[3:5].clone(), sigmas, disable=True, seed=9, sample_offset=3)
        assert torch.equal(full[3:5], part), name
        assert not torch.allclose(getattr(FK, name)(model, x.clone(), sigmas, disable=True, seed=10), full)
    torch.manual_seed(0)
    a = FK.sample_euler_ancestral(model, x.clone(), sigmas, disable=True)
    torch.manual_seed(0)
    b = FK.sample_euler_ancestral(model, x.clone(), sigmas, disable=True)
    assert torch.equal(a, b)                    # seed=None draws the seed from torch's generator


def test_default_noise_follows_the_contract():
    """euler_ancestral with eta = 1 is fastdiff's ei-x0 SDE step (η = 1): with no noise_sampler it uses the
    contract's step-k noise, so it equals fd.sample's torch reference bit for bit on PureVE."""
    cloud_x = x_T(40.0, n=5)
    times = fd.time_grid(PROC, 12, "karras", 0.05)
    times = times * (40.0 / float(times[0]))
    ours = FK.sample_euler_ancestral(model, cloud_x.clone(), times, disable=True, seed=4)
    ref = fd.sample(GM, x=cloud_x.clone(), times=times, method="ei-x0", seed=4, backend="torch")
    assert rel_err(ours, ref) <= RTOL


def test_named_errors():
    sigmas = karras(5)
    x = x_T(80.0)
    with pytest.raises(ValueError, match="solver_type"):
        FK.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, solver_type="rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        FK.sample_dpmpp_2m(model, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match="eta"):
        FK.sample_euler_ancestral(model, x, sigmas, disable=True, eta=-1.0)
    with pytest.raises(ValueError, match="order"):
        FK.sample_lms(model, x, sigmas, disable=True, order=0)
    with pytest.raises(TypeError, match="noise_sampler"):
        FK.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=3)
    with pytest.raises(ValueError, match="seed"):
        FK.sample_euler_ancestral(model, x, sigmas, disable=True, seed=-1)
    before = x.clone()
    FK.sample_dpmpp_2m(model, x, sigmas, disable=True)
    assert torch.equal(x, before)               # the caller's state is never modified
    assert math.isfinite(float(sigmas[0]))


def test_dpmpp_sde_contract_correlation_is_the_brownian_paths(K):
    """Without a noise_sampler, dpmpp_sde's two noises of a step get ρ = √((σ − σ_s)/(σ − σ')): the correlation
    k-diffusion's BrownianTreeNoiseSampler gives them (measured here on 10 000 entries of one tree)."""
    import fastdiff.methods as M
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0], dtype=torch.float64)
    table = M.sigma_table(sigmas, "dpmpp_sde")
    x = torch.zeros(10_000, 1, dtype=torch.float64)
    ns = K.BrownianTreeNoiseSampler(x, 0.7, 5.0, seed=3)
    for k in range(2):
        t, t_next = sigmas[k].log().neg(), sigmas[k + 1].log().neg()
        s = (t + (t_next - t) * 0.5).neg().exp()
        z1, z2 = ns(sigmas[k], s), ns(sigmas[k], sigmas[k + 1])
        assert abs(float((z1 * z2).mean()) - float(table.rho[k])) < 4 / 100          # 4 standard errors
        assert 0.3 < float(table.rho[k]) < 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sigmas_on_a_gpu_cost_one_host_sync():
    """The grid is read back once per call; the loop (model, table step, contract noise) never syncs."""
    dev = torch.device("cuda")
    sigmas = karras(10).to(dev)
    x = x_T(float(sigmas[0]), n=4).to(dev)
    def cheap_model(x, sigma):                              # sync-free: no host reads
        return x / (1 + sigma.view(-1, 1) ** 2)
    for name, kw in (("sample_dpmpp_2m_sde", {"seed": 1}), ("sample_dpmpp_sde", {"seed": 1}),
                     ("sample_heun", {"s_churn": 2.0, "seed": 1}), ("sample_lms", {})):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with __import__("warnings").catch_warnings(record=True) as caught:
                __import__("warnings").simplefilter("always")
                out = getattr(FK, name)(cheap_model, x, sigmas, disable=True, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 1, (name, [str(w.message) for w in syncs])
        assert out.device.type == "cuda" and bool(torch.isfinite(out).all())


class _HostReadCounter(torch.Tensor):
    """A grid that counts how often it (or a tensor computed from it) is read back to the host: on a GPU each
    such read is a synchronisation. A .to()/.cpu() copy counts once and returns a plain tensor."""

    reads = 0
    _READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("to", "cpu"):
            cls.reads += 1
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
        if name in cls._READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("name,kw", [("sample_dpmpp_2m_sde", {"seed": 1}), ("sample_dpmpp_sde", {"seed": 1}),
                                     ("sample_heun", {"s_churn": 2.0, "seed": 1}), ("sample_lms", {}),
                                     ("sample_dpmpp_3m_sde", {"seed": 2})])
def test_the_grid_is_read_back_once_per_call(name, kw):
    sigmas = karras(10).as_subclass(_HostReadCounter)
    _HostReadCounter.reads = 0
    out = getattr(FK, name)(model, x_T(80.0), sigmas, disable=True, **kw)
    assert _HostReadCounter.reads == 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_heun", "sample_dpmpp_sde",
                                  "sample_lms", "sample_euler_ancestral", "sample_dpmpp_3m_sde"])
def test_float32_and_extra_args(K, name):
    """float32 state, grid and model, with extra_args: equal to k-diffusion to float32 rounding (32 ulps of the
    largest value; measured ≤ 6e-7 relative)."""
    def model32(x, sigma, shift=0.0):
        return GM.denoise(x.double(), sigma.double()).float() + shift
    sigmas = karras(12).float()
    x = x_T(80.0).float()
    ns = KeyedNoise(sigmas, x.shape[0], dtype=torch.float32)
    kw = {"noise_sampler": ns} if "noise_sampler" in inspect.signature(getattr(K, name)).parameters else {}
    ours = getattr(FK, name)(model32, x.clone(), sigmas, extra_args={"shift": 0.01}, disable=True, **kw)
    theirs = getattr(K, name)(model32, x.clone(), sigmas, extra_args={"shift": 0.01}, disable=True, **kw)
    assert ours.dtype == torch.float32
    assert rel_err(ours, theirs) <= 32 * torch.finfo(torch.float32).eps
    assert rel_err(ours, getattr(FK, name)(model32, x.clone(), sigmas, disable=True, **kw)) > 1e-4   # shift used


class StaticOutputModel:
    """A model that writes every output into one buffer and returns it (a captured CUDA graph, an inference
    engine) and keeps every input it was called with (a trajectory recorder)."""

    def __init__(self):
        self.out, self.inputs = None, []

    def __call__(self, x, sigma):
        self.inputs.append((x, x.clone()))
        D = model(x, sigma)
        if self.out is None:
            self.out = torch.empty_like(D)
        return self.out.copy_(D)


@pytest.mark.parametrize("name,options", [("sample_heun", {}), ("sample_dpm_2", {}), ("sample_dpm_2_ancestral", {}),
                                          ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_sde", {"r": 0.3}),
                                          ("sample_dpmpp_2m", {}), ("sample_lms", {})])
def test_a_model_may_return_one_buffer_and_keep_its_inputs(K, name, options):
    """As in k-diffusion: a step uses D_0 up before the stage's model call overwrites the model's buffer, and every
    call gets an input of its own (a model that keeps its inputs sees them unchanged)."""
    sigmas = karras(8)
    x = x_T(80.0)
    noisy = "noise_sampler" in inspect.signature(getattr(K, name)).parameters
    kw = dict(options, noise_sampler=KeyedNoise(sigmas, x.shape[0])) if noisy else dict(options)
    static = StaticOutputModel()
    ours = getattr(FK, name)(static, x.clone(), sigmas, disable=True, **kw)
    theirs = getattr(K, name)(model, x.clone(), sigmas, disable=True, **kw)
    assert rel_err(ours, theirs) <= RTOL
    assert all(torch.equal(kept, copy) for kept, copy in static.inputs)


@pytest.mark.parametrize("x_dtype,model_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float64)])
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde"])
def test_a_wider_model_output_widens_the_run_as_in_k_diffusion(K, name, x_dtype, model_dtype):
    """k-diffusion's x + d·dt promotes: a float32 model on a float16 x runs (and returns) float32 from the first
    step. The same here: as close to the float64 run as k-diffusion's result is (k-diffusion forms the first
    step's ratio · x in x's dtype, fastdiff in the wider one), where staying in x's dtype was ~30x further."""
    def wide(x, sigma):
        return model(x.double(), sigma.double()).to(model_dtype)
    sigmas = karras(10)
    x = x_T(80.0).to(x_dtype)
    noisy = "noise_sampler" in inspect.signature(getattr(K, name)).parameters
    kw = {"noise_sampler": KeyedNoise(sigmas, x.shape[0], dtype=model_dtype)} if noisy else {}
    ours = getattr(FK, name)(wide, x.clone(), sigmas.to(model_dtype), disable=True, **kw)
    theirs = getattr(K, name)(wide, x.clone(), sigmas.to(model_dtype), disable=True, **kw)
    kw64 = {"noise_sampler": KeyedNoise(sigmas, x.shape[0])} if noisy else {}
    exact = getattr(FK, name)(model, x.double(), sigmas, disable=True, **kw64)
    assert ours.dtype == theirs.dtype == model_dtype
    assert rel_err(ours.double(), exact) <= 2 * rel_err(theirs.double(), exact) + 64 * torch.finfo(model_dtype).eps


def test_churn_bounds_are_compared_in_the_grids_dtype(K, monkeypatch):
    """s_tmax equal to a float32 grid value churns that step, as k-diffusion's float32 comparison does."""
    sigmas = torch.tensor([14.6, 5.0, 1.2, 0.3, 0.0], dtype=torch.float32)
    x = x_T(14.6).float()
    ns = KeyedNoise(sigmas, x.shape[0], dtype=torch.float32)
    seen = []
    ours = FK.sample_euler(lambda x, s: model(x.double(), s.double()).float(), x.clone(), sigmas, disable=True,
                           s_churn=1.0, s_tmax=1.2, noise_sampler=ns, callback=lambda d: seen.append(d["sigma_hat"]))
    with monkeypatch.context() as m:
        _patched_randn_like(m, ns)
        theirs = K.sample_euler(lambda x, s: model(x.double(), s.double()).float(), x.clone(), sigmas,
                                disable=True, s_churn=1.0, s_tmax=1.2)
    assert float(seen[2]) > 1.2                                   # the step at σ = 1.2 churned
    assert rel_err(ours, theirs) <= 32 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde"])
def test_eta_none_is_deterministic_as_in_k_diffusion(K, name):
    sigmas = karras(6)
    x = x_T(80.0)
    ns = KeyedNoise(sigmas, x.shape[0])
    ours = getattr(FK, name)(model, x.clone(), sigmas, disable=True, eta=None, noise_sampler=ns)
    theirs = getattr(K, name)(model, x.clone(), sigmas, disable=True, eta=None, noise_sampler=ns)
    assert rel_err(ours, theirs) <= RTOL
    assert rel_err(ours, getattr(FK, name)(model, x.clone(), sigmas, disable=True, eta=0.0)) <= RTOL


def test_sigmas_as_a_list_keep_float64():
    grid = [7.1234567891, 2.5, 0.3, 0.0]
    seen = []
    FK.sample_euler(lambda x, s: (seen.append(s), model(x, s))[1], x_T(7.0), grid, disable=True)
    assert seen[0].dtype == torch.float64 and float(seen[0][0]) == 7.1234567891


def test_more_named_errors():
    sigmas = karras(5)
    x = x_T(80.0)
    for bad in (1.7, True, "2"):
        with pytest.raises(TypeError, match="sample_offset"):
            FK.sample_euler_ancestral(model, x, sigmas, disable=True, sample_offset=bad)
    for bad in (2**63 - 2, 2**64):
        with pytest.raises(ValueError, match="sample_offset"):
            FK.sample_euler_ancestral(model, x, sigmas, disable=True, sample_offset=bad)
    with pytest.raises(TypeError, match="seed"):
        FK.sample_euler_ancestral(model, x, sigmas, disable=True, seed=1.0)
    with pytest.raises(TypeError, match="^model must return"):
        FK.sample_euler(lambda x, s: None, x, sigmas, disable=True)
    with pytest.raises(TypeError, match="^model must return"):
        FK.sample_euler(lambda x, s: x[:2], x, sigmas, disable=True)                 # does not broadcast to x
    with pytest.raises(TypeError, match="^noise_sampler must return"):
        FK.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=lambda a, b: x[:2])
    with pytest.raises(TypeError, match="^noise_sampler must return"):
        FK.sample_euler_ancestral(model, x[:1], sigmas, disable=True, noise_sampler=lambda a, b: x)  # widens x
    with pytest.raises(TypeError, match="eta must be a number, got None"):
        FK.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, eta=None)


def test_the_other_k_diffusion_names(K):
    t = karras(8)
    for order in (1, 2, 4):
        for j in range(order):
            assert FK.linear_multistep_coeff(order, t, 5, j) == pytest.approx(
                K.linear_multistep_coeff(order, t.numpy(), 5, j), rel=1e-4)      # k-diffusion's quad: epsrel 1e-4
    with pytest.raises(ValueError, match="too high"):
        FK.linear_multistep_coeff(4, t, 1, 0)
    x = x_T(80.0)
    assert FK.default_noise_sampler(x)(1.0, 0.5).shape == x.shape
    with pytest.raises(AttributeError, match="does not provide BrownianTreeNoiseSampler.*k_diffusion.sampling"):
        _ = FK.BrownianTreeNoiseSampler
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = FK.nonsense


def test_churn_bounds_and_options_are_numbers_on_every_grid_dtype():
    x = x_T(80.0).float()
    for grid in (karras(5), karras(5).float()):
        for bad in ([5.0], "5", True):
            with pytest.raises(TypeError, match="s_tmax must be a number"):
                FK.sample_euler(model, x.double(), grid, disable=True, s_churn=1.0, s_tmax=bad)
    import decimal

    import numpy as np
    a = FK.sample_euler_ancestral(model, x.double(), karras(5), disable=True, eta=np.array(0.5), seed=1)
    b = FK.sample_euler_ancestral(model, x.double(), karras(5), disable=True, eta=decimal.Decimal("0.5"), seed=1)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ review of the drop-in (k-diffusion 0.1.1)
NOISY = ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("name", [n for n in FK.__all__ if n.startswith("sample_")])
def test_an_integer_grid_runs_as_in_k_diffusion(K, monkeypatch, name):
    """torch.tensor([10, 5, 2, 1, 0]) is an int64 grid: k-diffusion runs it (its churn window compares in float),
    and so does every sampler here, to the same numbers."""
    sigmas = torch.tensor([10, 5, 2, 1, 0])
    x = x_T(10.0)
    noisy = "noise_sampler" in inspect.signature(getattr(K, name)).parameters
    ns = KeyedNoise(sigmas, x.shape[0])
    kw = {"noise_sampler": ns} if noisy else {}
    ours = getattr(FK, name)(model, x.clone(), sigmas, disable=True, **kw)
    with monkeypatch.context() as m:
        _patched_randn_like(m, ns)
        theirs = getattr(K, name)(model, x.clone(), sigmas, disable=True, **kw)
    assert rel_err(ours, theirs) <= 1e-6          # k-diffusion forms some coefficients in float32 on an int grid


def test_an_integer_grids_churn_window_is_not_truncated(K, monkeypatch):
    """s_tmin = 1.5 on the int grid [10, 5, 2, 1, 0]: σ = 1 is outside the window, as in k-diffusion (the bound
    used to be truncated to 1, which churned there)."""
    sigmas = torch.tensor([10, 5, 2, 1, 0])
    x = x_T(10.0)
    ns = KeyedNoise(sigmas, x.shape[0])
    seen = {"f": [], "k": []}
    ours = FK.sample_euler(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=1.5, noise_sampler=ns,
                           callback=lambda d: seen["f"].append(float(d["sigma_hat"])))
    with monkeypatch.context() as m:
        _patched_randn_like(m, ns)
        theirs = K.sample_euler(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=1.5,
                                callback=lambda d: seen["k"].append(float(d["sigma_hat"])))
    assert seen["f"] == pytest.approx(seen["k"], rel=1e-7) and seen["f"][3] == 1.0
    assert rel_err(ours, theirs) <= 1e-6


@pytest.mark.parametrize("name,option", [("sample_euler", "s_noise"), ("sample_euler", "s_churn"),
                                         ("sample_euler", "s_tmin"), ("sample_heun", "s_tmax"),
                                         ("sample_euler_ancestral", "s_noise"), ("sample_dpmpp_sde", "r"),
                                         ("sample_dpmpp_2m_sde", "s_noise"), ("sample_lms", "order")])
@pytest.mark.parametrize("with_noise_sampler", [False, True])
def test_none_options_raise_as_in_k_diffusion(K, name, option, with_noise_sampler):
    """None where k-diffusion computes with the option: k-diffusion raises TypeError, and so does fastdiff,
    naming it (they used to run with the default, or fail inside with an unnamed TypeError)."""
    sigmas = karras(5)
    x = x_T(80.0)
    kw = {option: None}
    if with_noise_sampler:
        if "noise_sampler" not in inspect.signature(getattr(K, name)).parameters:
            pytest.skip("k-diffusion's sampler takes no noise_sampler")
        kw["noise_sampler"] = KeyedNoise(sigmas, x.shape[0])
    with pytest.raises(TypeError):
        getattr(K, name)(model, x.clone(), sigmas, disable=True, **kw)
    with pytest.raises(TypeError, match=f"^{option} must be a number, got None"):
        getattr(FK, name)(model, x.clone(), sigmas, disable=True, **kw)


@pytest.mark.parametrize("name", NOISY)
def test_a_narrower_model_dtype_returns_what_k_diffusion_returns(K, name):
    """x float32, a float16 model: dpmpp_2m_sde and dpmpp_3m_sde end with x = denoised in k-diffusion, so they
    return float16; the others return float32. The same dtype here, and the same values to float16 rounding."""
    def half(x, sigma):
        return model(x.double(), sigma.double()).half()
    sigmas = karras(8).float()
    x = x_T(80.0).float()
    ns = KeyedNoise(sigmas, x.shape[0], dtype=torch.float32)
    ours = getattr(FK, name)(half, x.clone(), sigmas, disable=True, noise_sampler=ns)
    theirs = getattr(K, name)(half, x.clone(), sigmas, disable=True, noise_sampler=ns)
    assert ours.dtype == theirs.dtype
    assert rel_err(ours.double(), theirs.double()) <= 64 * torch.finfo(torch.float16).eps


class Recorder:
    """A noise sampler that records its calls and draws from a generator (a stateful one: its next draw depends
    on how often it was called)."""

    def __init__(self, n):
        self.calls, self.g, self.n = [], torch.Generator().manual_seed(5), n

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.n, 3, generator=self.g, dtype=torch.float64)


@pytest.mark.parametrize("name", NOISY)
@pytest.mark.parametrize("options", [{"eta": 0.0}, {"s_noise": 0.0}, {}, {"eta": 1.2}])
def test_the_noise_sampler_is_called_where_k_diffusion_calls_it(K, name, options):
    """Also where the draw is multiplied by 0 (eta = 0, s_noise = 0): the same calls, with the same arguments,
    so a stateful noise sampler then used for a second run gives the same second result."""
    sigmas = karras(6)
    x = x_T(80.0)
    ours_ns, theirs_ns = Recorder(x.shape[0]), Recorder(x.shape[0])
    ours = getattr(FK, name)(model, x.clone(), sigmas, disable=True, noise_sampler=ours_ns, **options)
    theirs = getattr(K, name)(model, x.clone(), sigmas, disable=True, noise_sampler=theirs_ns, **options)
    assert rel_err(ours, theirs) <= RTOL
    assert len(ours_ns.calls) == len(theirs_ns.calls)
    assert [v for c in ours_ns.calls for v in c] == pytest.approx([v for c in theirs_ns.calls for v in c], rel=1e-12)
    again = getattr(FK, name)(model, x.clone(), sigmas, disable=True, noise_sampler=ours_ns, eta=0.5)
    assert rel_err(again, getattr(K, name)(model, x.clone(), sigmas, disable=True, noise_sampler=theirs_ns,
                                           eta=0.5)) <= RTOL


@pytest.mark.parametrize("name", NOISY)
def test_outputs_that_broadcast_to_x_as_in_k_diffusion(K, name):
    """One noise shared by the batch ([1, d]) and a model output that broadcasts: k-diffusion's arithmetic
    accepts both, and so does fastdiff, to the same numbers. (dpmpp_2m_sde and dpmpp_3m_sde end with
    x = denoised in k-diffusion, returning the model's [1, d] itself; here x keeps its shape, the rows equal.)"""
    sigmas = karras(6)
    x = x_T(80.0)
    shared = KeyedNoise(sigmas, 1)

    def mean_model(x, sigma):
        return model(x, sigma).mean(0, keepdim=True)
    for m in (model, mean_model):
        ours = getattr(FK, name)(m, x.clone(), sigmas, disable=True, noise_sampler=shared)
        theirs = getattr(K, name)(m, x.clone(), sigmas, disable=True, noise_sampler=shared)
        assert ours.shape == x.shape
        assert rel_err(ours, theirs.expand(x.shape)) <= RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sample_dpmpp_2m", "sample_heun", "sample_lms", "sample_euler_ancestral",
                                  "sample_dpmpp_2m_sde", "sample_dpmpp_sde"])
def test_half_precision_rows_do_not_depend_on_the_batch(name, dtype):
    """float16 / bfloat16 states: rows 1..4 alone (sample_offset=1) equal the same rows of the whole batch of 37
    bit for bit (torch's CPU add_(alpha=) rounds these dtypes by position, which broke this for noise-free
    dpmpp_2m)."""
    def narrow(x, sigma):
        return model(x.double(), sigma.double()).to(x.dtype)
    sigmas = karras(8)
    x = x_T(80.0, n=37).to(dtype)
    kw = {} if name in ("sample_dpmpp_2m", "sample_heun", "sample_lms") else {"seed": 3}
    full = getattr(FK, name)(narrow, x.clone(), sigmas, disable=True, **kw)
    part = getattr(FK, name)(narrow, x[1:5].clone(), sigmas, disable=True,
                             **(dict(kw, sample_offset=1) if kw else {}))
    assert torch.equal(full[1:5], part)


def test_churn_bounds_that_switch_the_churn_off_or_on_everywhere(K, monkeypatch):
    """s_tmin = inf (never churn) and s_tmin < 0 (churn at every σ ≤ s_tmax) run as in k-diffusion."""
    sigmas = karras(6)
    x = x_T(80.0)
    ns = KeyedNoise(sigmas, x.shape[0])
    for s_tmin in (float("inf"), -1.0):
        ours = FK.sample_euler(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=s_tmin, noise_sampler=ns)
        with monkeypatch.context() as m:
            _patched_randn_like(m, ns)
            theirs = K.sample_euler(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=s_tmin)
        assert rel_err(ours, theirs) <= RTOL


def test_grid_and_helper_errors_name_the_problem():
    x = x_T(80.0)
    with pytest.raises(TypeError, match="sigmas must be real"):
        FK.sample_dpmpp_2m(model, x, karras(5).to(torch.complex128), disable=True)
    with pytest.raises(ValueError, match="dims"):
        FK.to_d(x, torch.ones(6, 1, 1, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="j must index"):
        FK.linear_multistep_coeff(2, karras(8), 5, 2)
