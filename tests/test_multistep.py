"""fastdiff.methods: the one table of every MATH.md §3b method, its torch executor and its Gaussian oracle.

- euler / ei / ei-x0 wrapped in the general table keep every bit (columns, samples, oracle);
- the contract noise drawn without host reads equals fastdiff.noise.normal bit for bit;
- the lift to other processes (σ̃ = σ/α) is checked by identities with fastdiff's own first-order tables
  (ei-x0 is euler_ancestral, DDIM is edm_euler) and by convergence of the exact output law (the oracle) to
  the data law at the method's order, on every process;
- sampled moments of the executor agree with the oracle within Monte Carlo error for every method;
- k-diffusion's own coefficients are checked in tests/test_k_diffusion.py.
"""
import math

import pytest
import torch

import fastdiff as fd
import fastdiff.methods as M
from fastdiff import _table

MEAN = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
PROCESSES = {"VP": fd.VP(), "OU": fd.OU(0.5, 1.0, 10.0), "PureVE": fd.PureVE(80.0),
             "DriftedVE": fd.DriftedVE(100.0, "t"), "VE": fd.VE(0.01, 50.0)}
FIRST_ORDER = ("edm_euler", "euler_ancestral")


def grid(p, K):
    return fd.time_grid(p, K, "logsnr", 1e-3 * p.T)


# ------------------------------------------------------------------------------ the first-order tables

@pytest.mark.parametrize("method", ["euler", "ei", "ei-x0"])
@pytest.mark.parametrize("pname", ["VP", "DriftedVE"])
def test_first_order_tables_wrap_bit_for_bit(method, pname):
    p = PROCESSES[pname]
    times = grid(p, 12)
    for ode in (False, True):
        st = fd.step_table(p, times, method, ode)
        mt = M.method_table(p, times, method, ode=ode)
        assert torch.equal(mt.A, st.A) and torch.equal(mt.B0, st.B) and torch.equal(mt.C, st.C)
        assert torch.equal(mt.t, st.t) and mt.history == 0 and not bool(mt.staged.any())


@pytest.mark.parametrize("method", ["euler", "ei", "ei-x0"])
def test_first_order_samples_are_fd_sample_bit_for_bit(method):
    p = PROCESSES["VP"]
    data = fd.Gaussian(MEAN, COV, p)
    times = grid(p, 10)
    for dtype in (torch.float32, torch.float64):
        x = p.prior(50, 2, seed=3, dtype=dtype)
        ref = fd.sample(data, x=x, times=times, method=method, seed=8, sample_offset=20, backend="torch")
        ours = M.sample_table(data, M.method_table(p, times, method), x, seed=8, sample_offset=20)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("method", ["euler", "ei", "ei-x0"])
def test_first_order_oracle_unchanged(method):
    p = PROCESSES["OU"]
    times = grid(p, 15)
    mu, S = fd.gaussian_oracle(p, times, method, mean=MEAN, cov=COV)
    mu2, S2 = M.table_oracle(M.method_table(p, times, method), fd.Gaussian(MEAN, COV, p))
    assert torch.allclose(mu, mu2, rtol=1e-13, atol=1e-14) and torch.allclose(S, S2, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ the noise

def test_contract_normal_is_noise_normal_bit_for_bit():
    for seed, idx, step, d in ((0, [0, 1, 2], 0, 3), (2**64 - 1, [5, 2**32 + 7, 2**40], M.STAGE_STEP_BASE + 9, 9),
                               (123456789, list(range(40)), M.CHURN_STEP_BASE + 3, 1)):
        like = torch.empty(len(idx), d, dtype=torch.float64)
        got = M.contract_normal(seed, torch.tensor(idx, dtype=torch.int64), step, like)
        assert torch.equal(got, fd.noise.normal(seed, torch.tensor(idx), step, d, dtype=torch.float64))
    like = torch.empty(4, 2, 3, 2, dtype=torch.float32)                  # any per-sample shape
    got = M.contract_normal(7, torch.arange(4), 11, like)
    assert got.shape == like.shape and got.dtype == torch.float32
    assert torch.equal(got.reshape(4, -1), fd.noise.normal(7, range(4), 11, 12))


def test_kernel_normal_is_the_contract_noise():
    """kernel_normal (the samplers' draw, through ops.affine_step's kernel) is contract_normal's noise: float32
    bit for bit on the CPU, float64 to 4e-16 relative (libm's log/cos against torch's), any per-sample shape and
    offset past 2³²; float16 takes the torch draw itself."""
    for seed, off, step, shape in ((0, 0, 0, (3, 3)), (2**64 - 1, 2**32 + 5, M.STAGE_STEP_BASE + 9, (40, 2, 3, 2)),
                                   (123456789, 7, M.CHURN_STEP_BASE + 3, (1, 1))):
        idx = torch.arange(off, off + shape[0], dtype=torch.int64)
        for dtype in (torch.float32, torch.float64):
            like = torch.empty(shape, dtype=dtype)
            got, want = M.kernel_normal(seed, off, step, like), M.contract_normal(seed, idx, step, like)
            assert got.shape == like.shape and got.dtype == dtype
            if dtype == torch.float32:
                assert torch.equal(got, want)
            else:
                assert torch.allclose(got, want, rtol=4e-16, atol=4e-16) and not torch.equal(got, torch.zeros_like(got))
        half = torch.empty(shape, dtype=torch.float16)
        assert torch.equal(M.kernel_normal(seed, off, step, half), M.contract_normal(seed, idx, step, half))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_noise_kernel_draws_are_kernel_normal(dtype):
    """ContractNoise(kernels=True) draws through one buffer per kind (churn, stage, step) and ops.affine_stepper:
    every draw is kernel_normal's bits over repeated draws of a kind, the stage draw survives the step draw that
    correlates with it (w = √(1 − ρ²) z + ρ z_stage, as before), and a state of another shape gets new buffers."""
    p = fd.VP()
    table = M.method_table(p, grid(p, 5), "dpmpp_sde", eta=0.7)
    rho = table.lists()["rho"]
    assert any(r != 0.0 for r in rho)
    for shape in ((9, 3), (4, 2, 5)):
        like = torch.empty(shape, dtype=dtype)
        noise = M.ContractNoise(table, 17, 2**32 + 3, shape[0], "cpu", kernels=True)
        for k in range(len(table)):
            churn = noise(k, "churn", like)
            assert torch.equal(churn, M.kernel_normal(17, 2**32 + 3, M.CHURN_STEP_BASE + k, like))
            stage = noise(k, "stage", like)
            zs = M.kernel_normal(17, 2**32 + 3, M.STAGE_STEP_BASE + k, like)
            assert torch.equal(stage, zs)
            w = noise(k, "step", like)
            want = M.kernel_normal(17, 2**32 + 3, k, like)
            if rho[k] != 0.0:
                want = want.mul_(math.sqrt(1 - rho[k] ** 2)).add_(zs, alpha=rho[k])
            assert torch.equal(w, want) and torch.equal(stage, zs), k


def test_stage_and_churn_streams_are_distinct():
    idx = torch.arange(1000)
    like = torch.empty(1000, 2, dtype=torch.float64)
    zs = [M.contract_normal(1, idx, base + 4, like) for base in (0, M.STAGE_STEP_BASE, M.CHURN_STEP_BASE)]
    for i in range(3):
        for j in range(i):
            assert abs(float((zs[i] * zs[j]).mean())) < 0.15                # independent, not copies


# --------------------------------------------------------------------------------------- the lift

@pytest.mark.parametrize("pname", ["VP", "OU", "DriftedVE", "PureVE"])
def test_lift_reproduces_fastdiffs_own_first_order_tables(pname):
    """k-diffusion's euler_ancestral with eta = 1 is ei-x0 (η = 1) and its euler is DDIM (ei-x0, η = 0) on every
    process: the lifted tables equal fastdiff's directly derived ones."""
    p = PROCESSES[pname]
    times = grid(p, 20)
    anc, sde = M.method_table(p, times, "euler_ancestral"), fd.step_table(p, times, "ei-x0")
    ddim, ode = M.method_table(p, times, "edm_euler"), fd.step_table(p, times, "ei-x0", ode=True)
    for got, want in ((anc.A, sde.A), (anc.B0, sde.B), (anc.C, sde.C), (ddim.A, ode.A), (ddim.B0, ode.B)):
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-300)
    # dpmpp_2m_sde's first step with eta = η² is ei-x0 with η
    for eta in (0.25, 1.0):
        two = M.method_table(p, times, "dpmpp_2m_sde", eta=eta)
        one = fd.step_table(p, times, "ei-x0", eta=math.sqrt(eta))
        assert torch.allclose(torch.stack([two.A[0], two.B0[0], two.C[0]]), torch.stack([one.A[0], one.B[0], one.C[0]]),
                              rtol=1e-11)


def test_ve_process_table_is_the_sigma_table():
    p = PROCESSES["PureVE"]                                             # σ = t, α = 1
    times = grid(p, 9)
    for method in M.NEW_METHODS:
        a, b = M.method_table(p, times, method), M.sigma_table(times, method)
        for name in ("A", "B", "C", "a_u", "b_u", "c_u", "B1", "hist_x", "hist_d", "P", "C_churn"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-14, atol=0), (method, name)
        assert torch.allclose(a.t_u[a.staged], b.t_u[b.staged], rtol=1e-14)


def _error_to_target(p, method, K, **options):
    times = grid(p, K)
    t_end = float(times[-1])
    a, s2 = p.alpha(t_end), p.sigma2(t_end)
    mu, S = fd.gaussian_oracle(p, times, method, mean=MEAN, cov=COV, **options)
    return float((mu - a * MEAN).norm() + (S - a * a * COV - s2 * torch.eye(2, dtype=torch.float64)).norm())


@pytest.mark.parametrize("pname", ["VP", "OU", "PureVE", "DriftedVE"])
def test_exact_output_law_converges_at_the_methods_order(pname):
    """The oracle's output law tends to the law of X_{t_end} as the grid is refined: by ≥ 2.8× from 16 to 64
    steps for first-order methods, ≥ 4.5× for the higher-order ones. A wrong lift or coefficient stalls."""
    p = PROCESSES[pname]
    for method in M.NEW_METHODS:
        e16, e64 = _error_to_target(p, method, 16), _error_to_target(p, method, 64)
        assert e64 < 0.2, (method, e64)
        assert e16 / e64 >= (2.8 if method in FIRST_ORDER else 4.5), (method, e16, e64)


# -------------------------------------------------------------------------- executor against the oracle

MC_CASES = [
    ("VP", "edm_euler", {}), ("OU", "edm_euler", {"s_churn": 4.0, "s_tmax": 5.0, "s_noise": 1.02}),
    ("VP", "euler_ancestral", {"eta": 0.7}), ("DriftedVE", "heun", {}),
    ("PureVE", "heun", {"s_churn": 3.0, "s_tmax": 40.0}), ("VP", "dpm_2", {"s_churn": 2.0, "s_tmax": 50.0}),
    ("OU", "dpm_2_ancestral", {}), ("VP", "dpmpp_2s_ancestral", {"eta": 0.8}), ("VP", "dpmpp_sde", {}),
    ("OU", "dpmpp_sde", {"eta": 0.6, "r": 0.4}), ("VP", "dpmpp_2m", {}), ("DriftedVE", "dpmpp_2m_sde", {}),
    ("VP", "dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}), ("OU", "dpmpp_3m_sde", {}),
    ("VE", "dpmpp_3m_sde", {"eta": 0.3}), ("PureVE", "lms", {}), ("VP", "lms", {"order": 3}),
]


@pytest.mark.parametrize("pname,method,options", MC_CASES, ids=[f"{p}-{m}-{i}" for i, (p, m, _) in enumerate(MC_CASES)])
def test_sampled_moments_match_the_oracle(pname, method, options):
    """10 000 samples (coarse 5-step grid, so the law is far from the data's and the method matters): the sample
    mean and covariance agree with the oracle within 5 Monte Carlo standard errors."""
    p = PROCESSES[pname]
    times = grid(p, 5)
    table = M.method_table(p, times, method, **options)
    data = fd.Gaussian(MEAN, COV, p)
    n = 10_000
    x = p.prior(n, 2, seed=1, dtype=torch.float64)
    out = M.sample_table(data, table, x, seed=2)
    mu, S = M.table_oracle(table, data)
    mean_err = (out.mean(0) - mu).abs()
    assert bool((mean_err <= 5 * (S.diagonal() / n).sqrt()).all()), (mean_err, mu)
    emp = torch.cov(out.T)
    se = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / n).sqrt()
    assert bool(((emp - S).abs() <= 5 * se).all()), (emp, S)
    # the sampler's law is not the data's on this coarse grid: the comparison has something to find
    assert float((S - COV).abs().max()) > 5 * float(se.max()) or float((mu - MEAN).abs().max()) > 0.05


def test_oracle_through_gaussian_oracle_and_final_denoise():
    p = PROCESSES["VP"]
    times = grid(p, 10)
    table = M.method_table(p, times, "dpmpp_2m_sde", solver_type="heun")
    data = fd.Gaussian(MEAN, COV, p)
    for fdn in (False, True):
        a = fd.gaussian_oracle(p, times, "dpmpp_2m_sde", mean=MEAN, cov=COV, solver_type="heun", final_denoise=fdn)
        b = M.table_oracle(table, data, final_denoise=fdn)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="solver_type"):
        fd.gaussian_oracle(p, times, "ei", mean=MEAN, cov=COV, solver_type="heun")


# --------------------------------------------------------------------------------- executor behaviour

def test_noise_does_not_depend_on_the_batch():
    p = PROCESSES["OU"]
    data = fd.Gaussian(MEAN, COV, p)
    times = grid(p, 6)
    x = p.prior(12, 2, seed=5, dtype=torch.float64)
    for method in ("dpmpp_sde", "heun", "dpmpp_3m_sde"):
        table = M.method_table(p, times, method, **({"s_churn": 2.0, "s_tmax": 5.0} if method == "heun" else {}))
        full = M.sample_table(data, table, x, seed=3)
        part = M.sample_table(data, table, x[4:9], seed=3, sample_offset=4)
        assert torch.equal(full[4:9], part), method
        assert not torch.allclose(M.sample_table(data, table, x, seed=4), full), method


def test_callback_sees_each_step_and_state_is_untouched():
    p = PROCESSES["VP"]
    data = fd.Gaussian(MEAN, COV, p)
    times = grid(p, 5)
    table = M.method_table(p, times, "heun")
    x = p.prior(7, 2, seed=5, dtype=torch.float32)
    before = x.clone()
    seen = []
    out = M.sample_table(data, table, x, callback=seen.append)
    assert torch.equal(x, before) and out.dtype == torch.float32
    assert [s["step"] for s in seen] == list(range(5))
    assert seen[0]["t"] == float(times[0]) and torch.equal(seen[0]["x"], before)
    assert torch.allclose(seen[2]["prediction"], data.denoise(seen[2]["x"], seen[2]["t"]))


def test_history_table_columns():
    """B₋₁ and B₋₂ are the named columns; LMS keeps derivatives (h_x = 1/σ, h_D = −1/σ on a σ-grid)."""
    sig = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.1, 0.0], dtype=torch.float64)
    t3 = M.sigma_table(sig, "dpmpp_3m_sde")
    assert t3.history == 2 and float(t3.Bm1[0]) == 0 and float(t3.Bm2[1]) == 0 and float(t3.Bm2[2]) != 0
    assert torch.equal(t3.B[:, 1], t3.Bm1) and torch.equal(t3.B[:, 2], t3.Bm2)
    lms = M.sigma_table(sig, "lms", order=3)
    assert torch.allclose(lms.hist_x, 1 / sig[:-1]) and torch.allclose(lms.hist_d, -1 / sig[:-1])
    # one-step methods have no history columns; asking for B₋₁ gives zeros
    eu = M.sigma_table(sig, "edm_euler")
    assert eu.history == 0 and torch.equal(eu.Bm1, torch.zeros(5, dtype=torch.float64))
    # the exactly integrated LMS weights sum to σ' − σ (they integrate a partition of unity)
    for k in range(5):
        c = M._lms_coefficients(sig.tolist(), k, min(k + 1, 3))
        assert math.isclose(sum(c), float(sig[k + 1] - sig[k]), rel_tol=1e-13)


def test_named_errors():
    p = PROCESSES["VP"]
    times = grid(p, 5)
    with pytest.raises(ValueError, match="method"):
        M.method_table(p, times, "rk45")
    with pytest.raises(TypeError, match="solver_type"):
        M.method_table(p, times, "dpmpp_2m", solver_type="heun")
    with pytest.raises(ValueError, match="solver_type"):
        M.method_table(p, times, "dpmpp_2m_sde", solver_type="rk4")
    with pytest.raises(ValueError, match="s_churn"):                    # σ̂ above the process's σ/α at T
        M.method_table(p, times, "heun", s_churn=3.0)
    with pytest.raises(ValueError, match="ode=True"):
        M.method_table(p, times, "dpmpp_sde", ode=True, eta=0.5)
    assert float(M.method_table(p, times, "dpmpp_sde", ode=True).C.abs().max()) == 0
    with pytest.raises(ValueError, match="sigmas"):
        M.sigma_table(torch.tensor([1.0, 2.0]), "dpmpp_2m")
    with pytest.raises(ValueError, match="r must"):
        M.sigma_table(torch.tensor([2.0, 1.0]), "dpmpp_sde", r=0)
    table = M.method_table(p, times, "dpmpp_2m")
    data = fd.Gaussian(MEAN, COV, p)
    with pytest.raises(ValueError, match="seed"):
        M.sample_table(data, table, torch.zeros(3, 2), seed=-1)
    with pytest.raises(ValueError, match="denoise must return"):
        M.run_table(table, lambda x, k, s: x[:, :1], torch.ones(3, 2), None)


def test_sigma_table_lift_is_the_process_table():
    """sigma_table(σ̃, log_alpha=...) (what the diffusers scheduler runs) lifts exactly as method_table does for a
    process with the same α(σ̃): VP, whose σ² = 1 − α² gives α = (1 + σ̃²)^(−1/2)."""
    p = PROCESSES["VP"]
    times = grid(p, 9)
    sig_t = (p.sigma2(times).sqrt() / p.alpha(times))
    for method in M.NEW_METHODS:
        a = M.method_table(p, times, method)
        b = M.sigma_table(sig_t, method, log_alpha=lambda s: -0.5 * torch.log1p(s * s))
        for name in ("A", "B", "C", "P", "a_u", "b_u", "c_u", "B1", "hist_x", "hist_d"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-14), (method, name)


def test_peers_stay_optional():
    """fastdiff.k_diffusion needs no k-diffusion; fastdiff.diffusers without diffusers says how to get it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['k_diffusion'] = None\n"
            "import fastdiff\n"
            "assert 'fastdiff.k_diffusion' not in sys.modules and 'fastdiff.diffusers' not in sys.modules\n"
            "assert callable(fastdiff.k_diffusion.sample_dpmpp_2m) and fastdiff.methods.run_table\n"
            "import fastdiff.methods, fastdiff.k_diffusion\n"
            "try:\n    import fastdiff.diffusers\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: fastdiff.diffusers needs diffusers: pip install" in out.stdout


# ------------------------------------------------------------------- fd.sample with every §3b method

def _k_sampler(method):
    return "sample_euler" if method == "edm_euler" else f"sample_{method}"


def _sigma_tilde_at_T(p):
    return math.exp(-float(p.log_snr(torch.tensor(p.T, dtype=torch.float64))))


def _fd_options(method, p):
    """Non-default settings of each method's own options (churn kept inside the process's range of σ/α)."""
    top = _sigma_tilde_at_T(p)
    return {"edm_euler": {"s_churn": 2.0, "s_tmax": 0.4 * top, "s_noise": 1.01},
            "euler_ancestral": {"eta": 0.7}, "heun": {"s_churn": 1.5, "s_tmin": 0.05, "s_tmax": 0.4 * top},
            "dpm_2": {"s_churn": 1.0, "s_tmax": 0.4 * top}, "dpm_2_ancestral": {"eta": 0.8, "s_noise": 0.95},
            "dpmpp_2s_ancestral": {"eta": 0.6}, "dpmpp_sde": {"eta": 0.7, "r": 0.4}, "dpmpp_2m": {},
            "dpmpp_2m_sde": {"solver_type": "heun", "eta": 0.5}, "dpmpp_3m_sde": {"eta": 0.8, "s_noise": 1.05},
            "lms": {"order": 3}}[method]


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("pname", ["VP", "DriftedVE"])
@pytest.mark.parametrize("method", M.NEW_METHODS)
def test_fd_sample_moments_match_the_table_oracle(method, pname):
    """fd.sample with every §3b method (default options, then the method's own settings): the moments of 4000
    float64 samples on a coarse 5-step grid agree with fd.gaussian_oracle within 5 Monte Carlo standard errors."""
    p = PROCESSES[pname]
    times = grid(p, 5)
    data = fd.Gaussian(MEAN, COV, p)
    n = 4000
    for i, options in enumerate(({}, _fd_options(method, p))):
        out = fd.sample(data, n=n, times=times, method=method, seed=11 + i, dtype=torch.float64, **options)
        mu, S = fd.gaussian_oracle(p, times, method, mean=MEAN, cov=COV, **options)
        mean_err = (out.mean(0) - mu).abs()
        assert bool((mean_err <= 5 * (S.diagonal() / n).sqrt()).all()), (options, mean_err, mu)
        se = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / n).sqrt()
        assert bool(((torch.cov(out.T) - S).abs() <= 5 * se).all()), (options, torch.cov(out.T), S)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
def test_fd_sample_moments_see_a_wrong_option():
    """The moment test has power: the oracle of another option setting is rejected by the same samples."""
    p = PROCESSES["VP"]
    times = grid(p, 5)
    n = 4000
    out = fd.sample(fd.Gaussian(MEAN, COV, p), n=n, times=times, method="dpmpp_2m_sde", seed=11, dtype=torch.float64)
    mu, S = fd.gaussian_oracle(p, times, "dpmpp_2m_sde", mean=MEAN, cov=COV, eta=0.3)
    se = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / n).sqrt()
    mean_ok = bool(((out.mean(0) - mu).abs() <= 5 * (S.diagonal() / n).sqrt()).all())
    assert not (mean_ok and bool(((torch.cov(out.T) - S).abs() <= 5 * se).all()))


K_CASES = [(m, {}) for m in M.NEW_METHODS] + [
    ("edm_euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.003}),
    ("heun", {"s_churn": 5.0, "s_tmax": 50.0, "s_noise": 1.01}),
    ("dpm_2", {"s_churn": 1.0, "s_tmin": 0.1, "s_tmax": 50.0}),
    ("euler_ancestral", {"eta": 0.6, "s_noise": 0.9}), ("dpm_2_ancestral", {"eta": 1.2}),
    ("dpmpp_2s_ancestral", {"eta": 0.3, "s_noise": 1.1}), ("dpmpp_sde", {"eta": 0.5, "r": 0.3}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.4}), ("dpmpp_2m_sde", {"s_noise": 0.8}),
    ("dpmpp_3m_sde", {"eta": 0.5}), ("lms", {"order": 2}),
]


@pytest.mark.parametrize("method,options", K_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(K_CASES)])
def test_fd_sample_on_a_ve_process_is_fastdiff_k_diffusion(method, options):
    """On k-diffusion's own process (σ = t, α = 1) fd.sample(method=X, seed=s) is fastdiff.k_diffusion's sample_X
    with the same contract noise (seed=s), whose results equal k-diffusion's (tests/test_k_diffusion.py): equal to
    float64 rounding (1e-12 relative: both run methods.run_table, but fd.sample's table is built from the
    process's σ(t) = exp(½ log σ²(t)), which may differ from t in the last bit)."""
    import fastdiff.k_diffusion as FK
    p = fd.PureVE(T=80.0)
    data = fd.GaussianMixture([0.6, 0.4], [[1.0, -2.0], [-1.5, 1.0]],
                              torch.stack([torch.eye(2) * 0.3, torch.diag(torch.tensor([0.5, 0.1]))]), p)
    times = fd.time_grid(p, 9, "karras", 0.02)
    x = p.prior(6, 2, seed=3, dtype=torch.float64)
    ours = fd.sample(data, x=x, times=times, method=method, seed=7, sample_offset=5, **options)
    noisy = any(name in options for name in ("s_churn",)) or "eta" in M.METHOD_OPTIONS[method]
    extra = {"seed": 7, "sample_offset": 5} if noisy else {}
    theirs = getattr(FK, _k_sampler(method))(lambda xx, s: data.denoise(xx, float(s[0])), x.clone(), times,
                                              disable=True, **extra, **options)
    assert float((ours - theirs).abs().max()) <= 1e-12 * float(theirs.abs().max())


@pytest.fixture
def small_cloud():
    g = torch.Generator().manual_seed(0)
    return fd.PointCloud(torch.randn(40, 2, generator=g), fd.VP())


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("method", M.NEW_METHODS)
def test_fd_sample_rows_do_not_depend_on_the_batch(method, small_cloud, capsys):
    """Row i of a chunked, offset or progress-bar run equals the single run bit for bit (point cloud, float32;
    a network predicting eps, float64)."""
    top = _sigma_tilde_at_T(small_cloud.process)
    options = {"s_churn": 1.0, "s_tmax": 0.4 * top} if "s_churn" in M.METHOD_OPTIONS[method] else {}
    kw = dict(steps=4, method=method, seed=5, **options)
    full = fd.sample(small_cloud, n=12, **kw)
    assert bool(torch.isfinite(full).all())
    assert torch.equal(full, fd.sample(small_cloud, n=12, progress=True, chunk_size=5, **kw))
    err = capsys.readouterr().err
    if method != "lms":                 # one fused op per chunk (on the CPU, churn and stages too): samples
        assert "12/12" in err and "sample" in err and "chunk" not in err
    else:
        assert "chunk 3/3" in err and "4/4" in err                      # the bar counts each chunk's steps
    assert torch.equal(full[7:11], fd.sample(small_cloud, n=4, sample_offset=7, **kw))
    G = fd.Gaussian(MEAN, COV, small_cloud.process)
    net = fd.from_model(lambda x, t: torch.tanh(x) * 0.3 + G.eps(x, float(t[0])), G.process, "eps")
    kw64 = dict(kw, dtype=torch.float64, shape=2)
    full = fd.sample(net, n=20, **kw64)
    assert torch.equal(full, fd.sample(net, n=20, chunk_size=3, **kw64))
    assert torch.equal(full[9:], fd.sample(net, n=11, sample_offset=9, **kw64))
    if method != "dpmpp_2m" and method != "lms":     # (deterministic methods: the seed does not matter)
        if options or "eta" in M.METHOD_OPTIONS[method]:
            assert not torch.equal(full, fd.sample(net, n=20, **(kw64 | {"seed": 6})))


@pytest.mark.parametrize("prediction", ["x0", "eps", "score"])
@pytest.mark.parametrize("method", ["heun", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms"])
def test_networks_of_every_prediction_sample_like_the_analytic_denoiser(method, prediction):
    p = fd.DriftedVE(T=100.0, beta="t^2")
    G = fd.Gaussian(MEAN, COV, p)
    native = {"x0": G.denoise, "eps": G.eps, "score": G.score}[prediction]
    net = fd.from_model(lambda x, t: native(x, float(t[0])), p, prediction)
    kw = dict(n=200, steps=12, method=method, seed=1, dtype=torch.float64, shape=2)
    assert torch.allclose(fd.sample(net, **kw), fd.sample(G, **kw), rtol=1e-8, atol=1e-8)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
def test_fd_sample_callback_trajectory_and_final_denoise(small_cloud):
    p = small_cloud.process
    G = fd.Gaussian(MEAN, COV, p)
    net = fd.from_model(lambda x, t: G.eps(x, float(t[0])), p, "eps")
    seen, ptrs = [], set()

    def keep(info):
        seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
        ptrs.add(info["x"].data_ptr())

    top = _sigma_tilde_at_T(p)
    kw = dict(steps=6, method="heun", seed=2, dtype=torch.float64, shape=2, s_churn=2.0, s_tmax=0.4 * top)
    x, traj = fd.sample(net, n=9, callback=keep, return_trajectory=True, chunk_size=5, **kw)
    assert [s["step"] for s in seen] == [0, 1, 2, 3, 4, 5] * 2
    assert [s["sample_offset"] for s in seen] == [0] * 6 + [5] * 6
    assert set(seen[0]) == {"step", "t", "x", "prediction", "denoised", "sample_offset"}
    table = M.method_table(p, seen and fd.time_grid(p, 6), "heun", s_churn=2.0, s_tmax=0.4 * top)
    assert [s["t"] for s in seen[:6]] == table.t.tolist()                   # t̂: churned where σ̃ <= s_tmax
    assert float(table.t[-1]) > float(table.times[-2]) and float(table.t[0]) == float(table.times[0])
    for s in seen[:6]:
        assert torch.allclose(s["prediction"], G.eps(s["x"], s["t"]), rtol=1e-12, atol=1e-12)       # native
        assert torch.allclose(s["denoised"], G.denoise(s["x"], s["t"]), rtol=1e-10, atol=1e-10)    # D
    assert len(ptrs) <= 4                    # the state buffers are reused (two per chunk), not one per step
    assert traj.shape == (7, 9, 2) and torch.equal(traj[-1], x)
    assert torch.equal(traj[0], p.prior(9, 2, seed=2, dtype=torch.float64))
    assert torch.equal(x, fd.sample(net, n=9, **kw))                       # a reading callback changes nothing
    den = fd.sample(net, n=9, final_denoise=True, **kw)
    assert torch.allclose(den, G.denoise(x, float(fd.time_grid(p, 6)[-1])), rtol=1e-12, atol=1e-12)
    # modifying info["x"] in place changes the run
    def shift(info):
        info["x"].add_(1.0) if info["step"] == 3 else None
    assert not torch.allclose(fd.sample(net, n=9, callback=shift, **kw), x)
    # a point cloud with a callback: D is its posterior
    got = []
    fd.sample(small_cloud, n=4, steps=3, method="dpmpp_2m", callback=lambda info: got.append(
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()}))
    assert torch.allclose(got[1]["denoised"], small_cloud.denoise(got[1]["x"], got[1]["t"]), rtol=1e-5, atol=1e-5)


def test_fd_sample_method_errors_name_the_valid_choices(small_cloud):
    x = torch.randn(5, 2) * 3
    before = x.clone()
    with pytest.raises(ValueError, match="unknown method 'dpmpp_4m'.*'dpmpp_2m'.*'lms'"):
        fd.sample(small_cloud, x=x, steps=4, method="dpmpp_4m")
    with pytest.raises(ValueError, match="'dpmpp_2m' takes no s_churn; its options are none"):
        fd.sample(small_cloud, x=x, steps=4, method="dpmpp_2m", s_churn=1.0)
    with pytest.raises(ValueError, match="'heun' takes no eta; its options are s_churn, s_tmin, s_tmax, s_noise"):
        fd.sample(small_cloud, x=x, steps=4, method="heun", eta=0.5)
    with pytest.raises(ValueError, match="'ei' takes no order; its options are eta"):
        fd.sample(small_cloud, x=x, steps=4, method="ei", order=2)
    with pytest.raises(ValueError, match="unknown solver_type 'rk4'; choose one of 'midpoint', 'heun'"):
        fd.sample(small_cloud, x=x, steps=4, method="dpmpp_2m_sde", solver_type="rk4")
    with pytest.raises(ValueError, match="order must be >= 1"):
        fd.sample(small_cloud, x=x, steps=4, method="lms", order=0)
    # a number's option takes numbers only, and an integer's never a float: each refusal names the option
    for method, option, value in [("lms", "order", 3.0), ("dpmpp_sde", "eta", "1"), ("dpmpp_sde", "eta", True),
                                  ("dpmpp_sde", "eta", torch.tensor([0.5, 0.5])), ("heun", "s_tmax", [5.0]),
                                  ("heun", "s_churn", "lots"), ("dpmpp_sde", "r", [0.5]), ("ei", "eta", "1")]:
        with pytest.raises(TypeError, match=f"^{option} must be"):
            fd.sample(small_cloud, x=x, steps=4, method=method, **{option: value})
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        fd.sample(small_cloud, x=x, steps=4, method="dpmpp_sde", eta=-1.0)
    with pytest.raises(ValueError, match="s_churn"):                     # σ̂ beyond the process's σ/α at T
        fd.sample(small_cloud, x=x, steps=4, method="heun", s_churn=3.0)
    with pytest.raises(ValueError, match="ode=True"):
        fd.sample(small_cloud, x=x, steps=4, method="dpmpp_2m_sde", ode=True, eta=0.5)
    with pytest.raises(ValueError, match="cuda_graph=True: method 'lms' runs the torch table executor.*lms keeps"):
        fd.sample(small_cloud, x=x, steps=4, method="lms", cuda_graph=True)
    net = fd.from_model(lambda x, t: x, small_cloud.process)
    with pytest.raises(ValueError, match="two-stage.*backend='cpu' has no kernel for it"):
        fd.sample(net, x=x, steps=4, method="heun", backend="cpu")
    assert torch.equal(x, before)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
def test_fd_sample_ode_variant_is_deterministic(small_cloud):
    x = small_cloud.process.prior(6, 2, seed=4)
    kw = dict(x=x, steps=5, method="dpmpp_2m_sde")
    assert torch.equal(fd.sample(small_cloud, seed=1, ode=True, **kw), fd.sample(small_cloud, seed=2, ode=True, **kw))
    assert not torch.equal(fd.sample(small_cloud, seed=1, **kw), fd.sample(small_cloud, seed=2, **kw))


def test_help_documents_every_method_and_option():
    doc = fd.sample.__doc__
    for name in M.NEW_METHODS:
        assert f'"{name}"' in doc, name
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise", "solver_type", "order", "r", "eta"):
        assert f"\n    {name} " in doc, name
    assert "MethodTable.kernel_table" in doc and "table executor" in doc and "denoised" in doc   # fused or not


@pytest.mark.parametrize("pname", ["VP", "DriftedVE", "OU"])
def test_unit_gaussian_variance_is_the_oracles_and_poor_grids_warn(pname):
    """fd.sample's grid check for the §3b methods: the float recursion equals table_oracle on 1-D N(0, 1) data
    (1e-9, as the first-order check in test_sampling: on a poor grid the covariance passes through large terms
    that cancel, so two float64 summation orders differ by ~1e-11), and a grid that would give variance outside
    [1/4, 4] warns, the default one does not."""
    import warnings
    p = PROCESSES[pname]
    one = fd.Gaussian(torch.zeros(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), p)
    for method in M.NEW_METHODS:
        for K, schedule in ((3, "logsnr"), (12, "uniform")):
            options = {"eta": 0.6} if "eta" in M.METHOD_OPTIONS[method] else {}
            table = M.method_table(p, fd.time_grid(p, K, schedule), method, **options)
            _, S = M.table_oracle(table, one)
            assert M.unit_gaussian_variance(table, p) == pytest.approx(float(S), rel=1e-9, abs=0), (method, K)
    G = fd.Gaussian(MEAN, COV, fd.DriftedVE(T=100.0))
    with pytest.warns(fd.GridWarning, match="method='dpmpp_3m_sde'.*variance would be 140"):
        fd.sample(G, n=4, steps=20, schedule="uniform", method="dpmpp_3m_sde")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fd.GridWarning)
        fd.sample(G, n=4, steps=30, method="dpmpp_3m_sde")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fd_sample_table_methods_on_cuda_sync_a_fixed_number_of_times():
    """The table executor's loop (network, table step, contract noise) never reads back to the host: the syncs
    of a call (its input and result checks) do not grow with the number of steps. Measured on an H200: 2 per
    call for 10 and 20 steps, for ei as for dpmpp_2m, dpmpp_2m_sde, heun, dpmpp_sde and lms."""
    import warnings
    lin = torch.nn.Linear(8, 8).cuda()
    net = fd.from_model(lambda x, t: torch.tanh(lin(x)), fd.VP(), "eps")
    x = torch.randn(64, 8, device="cuda")
    counts = {}
    for method in ("dpmpp_2m_sde", "heun", "dpmpp_sde", "lms"):
        for K in (10, 20):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = fd.sample(net, x=x, steps=K, method=method, seed=1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            counts[method, K] = len([w for w in caught if "synchroniz" in str(w.message)])
            assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
        assert counts[method, 10] == counts[method, 20] <= 4, counts


def test_eps_networks_where_float32_cannot_form_D_are_refused_up_front():
    """The aggressive drifted VE at T = 625 reaches α = e^{-208}: an eps network's D = (x − σ ε)/α cannot be formed
    in float32 (it would turn into inf/NaN mid-run), so fd.sample says so before running; float64 works."""
    p = fd.DriftedVE(T=625.0, beta="t^2")
    G = fd.Gaussian(MEAN, COV, p)
    net = fd.from_model(lambda x, t: G.eps(x.double(), float(t[0])).to(x.dtype), p, "eps")
    x = p.prior(50, 2, seed=1)
    with pytest.raises(ValueError, match="float64.*x0 network"):
        fd.sample(net, x=x, steps=40, method="dpmpp_2m")
    assert bool(torch.isfinite(fd.sample(net, x=x, steps=40, method="ei-x0")).all())   # never forms D
    kw = dict(x=x.double(), steps=40, method="dpmpp_2m")
    assert torch.allclose(fd.sample(net, **kw), fd.sample(G, **kw), rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ fused point-cloud runs (issue 14, item 4)
# The methods whose table the whole-trajectory kernels express with one-step rows (no churn, one stage, history
# = D, H <= 2), and the churned and two-stage ones (STAGE_CASES): every backend runs them fused.
FUSED_METHODS = ("edm_euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
MULTISTEP_METHODS = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
STAGE_CASES = [("heun", {}), ("heun", {"s_churn": 1.0, "s_tmax": 5.0}), ("dpm_2", {}),
               ("dpm_2_ancestral", {"eta": 0.8}), ("dpmpp_2s_ancestral", {}), ("dpmpp_sde", {}),
               ("dpmpp_sde", {"eta": 0.6, "r": 0.4}), ("edm_euler", {"s_churn": 1.0, "s_tmax": 5.0, "s_noise": 1.01})]
ONE_STEP_CASES = [("edm_euler", {}), ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
                  ("dpmpp_2m", {}), ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}),
                  ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"s_noise": 1.1})]
FUSED_CASES = ONE_STEP_CASES + STAGE_CASES
FUSED_BACKENDS = ["torch", "cpu", pytest.param("cuda_emu", marks=pytest.mark.cuda_emu), "triton"]


def _backend_or_skip(name):
    if name == "cuda_emu":
        import contract  # registers the test-only emulator backend (tests/contract.py)
        contract.register_cuda_emu()
    reasons = fd._backend.BACKENDS[name].unavailable_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))
    return name


def _count_fused_calls(monkeypatch):
    calls = []
    original = fd.ops.pointcloud_sample

    def counting(x, data, table, *args, **kwargs):
        calls.append(table)
        return original(x, data, table, *args, **kwargs)

    monkeypatch.setattr(fd.ops, "pointcloud_sample", counting)
    return calls


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("method, options", FUSED_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(FUSED_CASES)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fd_sample_runs_a_point_cloud_multistep_method_fused(method, options, backend, dtype, monkeypatch):
    """A point cloud with an expressible method and no callback runs ops.pointcloud_sample once per chunk with
    the method's kernel table, and equals the table executor on the same backend (a no-op callback runs it):
    float64 within 1e-12 relative; float32 within twice the largest of the float32 references' own errors (the
    executor on this backend, the torch backend's fused table and executor, the CPU kernels' when this is
    another backend; all against the float64 executor on the torch backend) + 4 eps32 of the scale, the
    kernels' float32 standard (tests/contract.py fa_close)."""
    backend = _backend_or_skip(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32")
    g = torch.Generator().manual_seed(1)
    data = torch.randn(31, 3, generator=g, dtype=torch.float64)
    p = fd.VP()
    x0 = p.prior(37, 3, seed=2, dtype=torch.float64)
    cloud, cloud64 = fd.PointCloud(data.to(dtype), p), fd.PointCloud(data, p)
    kw = dict(steps=9, method=method, seed=4, sample_offset=3, backend=backend, return_trajectory=True, **options)
    calls = _count_fused_calls(monkeypatch)
    fused, traj = fd.sample(cloud, x=x0.to(dtype), **kw)
    B1, B2 = calls[0][:, _table.B1], calls[0][:, _table.B2]
    assert len(calls) == 1 and B1[0] == 0 and not bool(B2[:2].any())   # no D before row 0
    assert bool(B1[1:].any()) == (method in MULTISTEP_METHODS)   # the multistep columns went down as they are
    assert bool(B2[2:].any()) == (method == "dpmpp_3m_sde")
    assert _table.uses_stages(calls[0]) == ((method, options) in STAGE_CASES)
    n_calls = len(calls)
    steps = fd.sample(cloud, x=x0.to(dtype), callback=lambda info: None, **kw)
    assert len(calls) == n_calls                                     # the callback ran the executor
    assert torch.equal(traj[-1], fused) and torch.equal(traj[0], x0.to(dtype))
    if dtype == torch.float64:
        for a, b in ((fused, steps[0]), (traj, steps[1])):
            err = float((a - b).abs().max())
            assert err <= 1e-12 * float(b.abs().max()), f"{method}: {err:.3g}"
        return
    ref, ref_traj = fd.sample(cloud64, x=x0, callback=lambda info: None, **(kw | {"backend": "torch"}))
    # The float32 references: the executor stepping this backend's ops, the plain-torch run of the same kernel
    # table (fastdiff.reference.pointcloud_sample in float32) and the torch backend's executor, plus the CPU
    # kernels' fused and stepped runs when this is another backend. The largest of their own errors is the base.
    # Why so many: near σ_min a 9-step SDE run amplifies float32 rounding ~100×, so each float32 run's final
    # error is one draw from a wide spread (2M SDE: 3.5e-7 to 3.2e-6 across these six runs on an AMD EPYC with
    # numpy's AVX2 exp/log under the interpreter; 3M SDE: 1.2e-5 to 5.6e-5), and with two draws a kernel as
    # exact as the rest failed 2·base. A wrong term (a coefficient, a history slot, a noise stream) moves the
    # result by O(0.1), far outside any of them.
    torch_kw = kw | {"backend": "torch"}
    bases = [steps, fd.sample(cloud, x=x0.to(dtype), **torch_kw),
             fd.sample(cloud, x=x0.to(dtype), callback=lambda info: None, **torch_kw)]
    if backend != "cpu" and not fd._backend.BACKENDS["cpu"].unavailable_reasons():
        cpu_kw = kw | {"backend": "cpu"}
        bases += [fd.sample(cloud, x=x0.to(dtype), **cpu_kw),
                  fd.sample(cloud, x=x0.to(dtype), callback=lambda info: None, **cpu_kw)]
    for i, (a, r) in enumerate(((fused, ref), (traj, ref_traj))):
        err = float((a.double() - r).abs().max())
        base = max(float((b[i].double() - r).abs().max()) for b in bases)
        atol = 4 * torch.finfo(torch.float32).eps * (float(r.abs().max()) + 1)
        assert err <= 2 * base + atol, f"{method}: {err:.3g} > 2·{base:.3g} + {atol:.3g}"


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda_emu", marks=pytest.mark.cuda_emu)])
def test_fd_sample_fused_multistep_at_large_d_equals_the_executor(backend, monkeypatch):
    """d = 65: the kernels' large-d path (history in scratch buffers) for the 3M SDE, float64, with weights and a
    bandwidth, against the executor (1e-12 relative), rows independent of the chunking."""
    backend = _backend_or_skip(backend)
    g = torch.Generator().manual_seed(3)
    p = fd.VP()
    cloud = fd.PointCloud(torch.randn(23, 65, generator=g, dtype=torch.float64), p,
                          weights=torch.rand(23, generator=g, dtype=torch.float64) + 0.1,
                          bandwidth=0.05)
    x0 = p.prior(11, 65, seed=3, dtype=torch.float64)
    kw = dict(steps=6, method="dpmpp_3m_sde", seed=8, backend=backend)
    calls = _count_fused_calls(monkeypatch)
    fused = fd.sample(cloud, x=x0, **kw)
    assert len(calls) == 1
    steps = fd.sample(cloud, x=x0, callback=lambda info: None, **kw)
    assert float((fused - steps).abs().max()) <= 1e-12 * float(steps.abs().max())
    assert torch.equal(fused, fd.sample(cloud, x=x0, chunk_size=4, **kw))


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("options", [{}, {"order": 2}])
def test_fd_sample_keeps_the_executor_for_tables_the_kernels_cannot_express(options, small_cloud, monkeypatch):
    """lms (history (x − D)/σ, order up to 4) has no kernel table: the executor runs it (ops.pointcloud_sample is
    never called), and MethodTable says why."""
    calls = _count_fused_calls(monkeypatch)
    out = fd.sample(small_cloud, n=6, steps=5, method="lms", seed=1, **options)
    assert calls == [] and bool(torch.isfinite(out).all())
    p = small_cloud.process
    table = M.method_table(p, grid(p, 5), "lms", **options)
    assert table.kernel_table(p) is None and "lms keeps" in table.kernel_table_refusal()


@pytest.mark.parametrize("method", FUSED_METHODS)
def test_kernel_table_is_the_method_tables_columns(method):
    """MethodTable.kernel_table: t, α(t), σ(t) where D_0 is evaluated, and A, B0, B₋₁, B₋₂, C exactly the method's
    columns (the executor's coefficients), on a drifted process so α ≠ 1."""
    p = PROCESSES["DriftedVE"]
    table = M.method_table(p, grid(p, 7), method)
    kt = table.kernel_table(p)
    assert table.kernel_table_refusal() is None and kt.dtype == torch.float64 and kt.shape == (7, _table.WIDTH)
    expected = torch.stack([table.t, torch.exp(p._log_alpha(table.t)), torch.sqrt(p._sigma2(table.t)), table.A,
                            table.B0, table.Bm1, table.Bm2, table.C], dim=1)
    assert torch.equal(kt[:, :_table.P], expected)
    assert not _table.uses_stages(kt) and bool((kt[:, [_table.P, _table.ALPHA_U, _table.SIGMA_U]] == 1).all())
    assert not bool(kt[:, [_table.CCHURN, _table.UX, _table.UD, _table.UZ, _table.BU, _table.RHO]].any())
    assert not bool((kt[:, 1] == 1).all())


@pytest.mark.parametrize("method, options", STAGE_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(STAGE_CASES)])
def test_kernel_table_carries_the_churn_and_the_stage(method, options):
    """A churned or two-stage method's kernel table: P and Cchurn as the method's, and on each staged row α and σ
    at t_u, the stage point's coefficients, D_u's weight and rho exactly the executor's; 0 (and α = σ = 1) on the
    rows without a stage (a two-stage method's last step to σ = 0 is an Euler step)."""
    p = PROCESSES["DriftedVE"]
    table = M.method_table(p, grid(p, 6), method, **options)
    kt = table.kernel_table(p)
    st = table.staged
    assert table.kernel_table_refusal() is None and kt.shape == (6, _table.WIDTH)
    assert torch.equal(kt[:, _table.P], table.P) and torch.equal(kt[:, _table.CCHURN], table.C_churn)
    assert torch.equal(kt[st, _table.ALPHA_U], torch.exp(p._log_alpha(table.t_u[st])))
    assert torch.equal(kt[st, _table.SIGMA_U], torch.sqrt(p._sigma2(table.t_u[st])))
    for col, src in ((_table.UX, table.a_u), (_table.UD, table.b_u), (_table.UZ, table.c_u), (_table.BU, table.B1)):
        assert torch.equal(kt[st, col], src[st]) and not bool(kt[~st, col].any())
    assert torch.equal(kt[:, _table.RHO], table.rho)
    assert bool((kt[~st][:, [_table.ALPHA_U, _table.SIGMA_U]] == 1).all())
    assert _table.uses_stages(kt)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
def test_fd_sample_fused_multistep_progress_bar_keeps_the_bits(small_cloud, capsys):
    """A progress bar with few rows splits a fused multistep run into row chunks (it never switches to the table
    executor, whose rounding differs): the result is the run without a bar, bit for bit."""
    kw = dict(n=9, steps=6, method="dpmpp_2m_sde", seed=2, backend="cpu")
    if fd._backend.BACKENDS["cpu"].unavailable_reasons():
        kw["backend"] = "torch"
    assert torch.equal(fd.sample(small_cloud, **kw), fd.sample(small_cloud, progress=True, **kw))
    err = capsys.readouterr().err
    assert "9/9" in err and "sample" in err


# ------------------------------------------------------------ a user model's fused multistep loop (issue 14, item 4)
MODEL_BACKENDS = ["torch", "cpu", "triton", pytest.param("cuda_emu", marks=pytest.mark.cuda_emu),
                  pytest.param("cuda", marks=pytest.mark.gpu)]


def _gaussian_net(p, prediction):
    """A network with the exact Gaussian denoiser's output in `prediction` (x0, eps or score)."""
    G = fd.Gaussian(MEAN, COV, p)
    native = {"x0": G.denoise, "eps": G.eps, "score": G.score}[prediction]
    return fd.from_model(lambda x, t: native(x, float(t[0])), p, prediction)


def _executor_sample(monkeypatch, net, **kw):
    """fd.sample with the torch table executor in place of the fused model loop (the reference)."""
    import fastdiff.sampling as S
    with monkeypatch.context() as m:
        m.setattr(S, "_HistoryRun", lambda *args, graphed=False: S._TableRun(*args))
        return fd.sample(net, **kw)


def _count_affine_calls(monkeypatch):
    """(history pairs, backend) of each affine step fd.sample's model loop takes (through ops.affine_stepper).
    The table executor's kernel noise draws (methods.ContractNoise) step their own buffer with D = that buffer:
    they are not model-loop steps and are not counted."""
    calls = []
    original = fd.ops.affine_stepper

    def stepper(x, seed, sample_offset, steps, *, backend="auto"):
        step = original(x, seed, sample_offset, steps, backend=backend)

        def counting(k, D, A, B, C, history=()):
            if D is not x:
                calls.append((len(history), backend))
            return step(k, D, A, B, C, history)
        return counting

    monkeypatch.setattr(fd.ops, "affine_stepper", stepper)
    return calls


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("method, options", ONE_STEP_CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(ONE_STEP_CASES)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fd_sample_model_multistep_runs_one_fused_affine_step_per_step(method, options, backend, dtype,
                                                                       monkeypatch):
    """A user model with an expressible method runs one ops.affine_step per step on the chosen backend, with the
    history (B1, D_{k−1}), (B2, D_{k−2}) where the method has it, and equals the table executor: float64 within
    1e-12 relative; float32 within twice the executor's own float32 error (both against the float64 executor)
    + 4 eps32 of the scale (tests/contract.py fa_close). The trajectory too; rows do not depend on the chunking."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels run float32")
    on_gpu = backend == "cuda" or backend == "triton" and torch.cuda.is_available()
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    backend = _backend_or_skip(backend)
    p = fd.VP()
    net = _gaussian_net(p, "eps" if method in ("dpmpp_2m", "euler_ancestral") else "x0")
    x0 = p.prior(37, 2, seed=2, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    K = 9
    kw = dict(steps=K, method=method, seed=4, sample_offset=3, backend=backend, return_trajectory=True, **options)
    calls = _count_affine_calls(monkeypatch)
    fused, traj = fd.sample(net, x=x0.to(dtype), **kw)
    assert len(calls) == K and {b for _, b in calls} == {backend}
    depth = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m_sde": 2}.get(method, 0)
    assert max(n for n, _ in calls) == depth and [n for n, _ in calls[:2]] == [0, min(depth, 1)]
    exe, exe_traj = _executor_sample(monkeypatch, net, x=x0.to(dtype), **kw)
    assert len(calls) == K                                              # the executor calls no affine_step
    assert torch.equal(traj[-1], fused) and torch.equal(traj[0], x0.to(dtype))
    if dtype == torch.float64:
        for a, b in ((fused, exe), (traj, exe_traj)):
            err = float((a - b).abs().max())
            assert err <= 1e-12 * float(b.abs().max()), f"{method}: {err:.3g}"
    else:
        ref, ref_traj = _executor_sample(monkeypatch, net, x=x0, **(kw | {"backend": "torch"}))
        for a, b, r in ((fused, exe, ref), (traj, exe_traj, ref_traj)):
            err, base = float((a.double() - r).abs().max()), float((b.double() - r).abs().max())
            atol = 4 * torch.finfo(torch.float32).eps * (float(r.abs().max()) + 1)
            assert err <= 2 * base + atol, f"{method}: {err:.3g} > 2·{base:.3g} + {atol:.3g}"
    if backend in ("torch", "cpu", "cuda"):
        kw.pop("return_trajectory")
        assert torch.equal(fused, fd.sample(net, x=x0.to(dtype), chunk_size=10, **kw))


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("prediction", ["x0", "eps", "score"])
def test_fd_sample_model_multistep_callback_is_the_executors(prediction, monkeypatch):
    """The fused loop's callback gets the executor's info dict (keys, step, t, x, prediction, denoised,
    sample_offset) with the same values, and an in-place edit of `denoised` reaches the history as there. (On VP:
    a drifted VE's eps → D conversion at σ/α ~ 300 multiplies a one-ulp difference ~1e3 per step, on either path.)"""
    p = fd.VP()
    net = _gaussian_net(p, prediction)
    x0 = p.prior(13, 2, seed=5, dtype=torch.float64)

    def run(sampler, edit):
        infos = []

        def cb(info):
            infos.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
            if edit:
                info["denoised"].mul_(0.75)
        out = sampler(net, x=x0, steps=7, method="dpmpp_3m_sde", seed=2, sample_offset=5, callback=cb,
                      backend="cpu")
        return out, infos

    for edit in (False, True):
        (got, infos), (want, want_infos) = run(fd.sample, edit), run(partial_executor(monkeypatch), edit)
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
        assert len(infos) == len(want_infos) == 7
        for a, b in zip(infos, want_infos, strict=True):
            assert a.keys() == b.keys() == {"step", "t", "x", "prediction", "denoised", "sample_offset"}
            assert (a["step"], a["t"], a["sample_offset"]) == (b["step"], b["t"], b["sample_offset"])
            for key in ("x", "prediction", "denoised"):
                assert torch.allclose(a[key], b[key], rtol=1e-12, atol=1e-12 * float(b[key].abs().max())), key
    # the edit changed the result (it reached the update and the history)
    assert not torch.allclose(run(fd.sample, True)[0], run(fd.sample, False)[0])


def partial_executor(monkeypatch):
    return lambda net, **kw: _executor_sample(monkeypatch, net, **kw)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("method, options, why", [("heun", {}, "two-stage"), ("lms", {}, "lms keeps"),
                                                  ("dpmpp_sde", {}, "two-stage"),
                                                  ("edm_euler", {"s_churn": 1.0, "s_tmax": 5.0}, "churns")])
def test_fd_sample_model_keeps_the_executor_for_tables_the_kernels_cannot_express(method, options, why,
                                                                                   monkeypatch):
    """A model with a table the affine step cannot express: backend='auto' (or 'torch') runs the executor (no
    ops.affine_step), a kernel backend is refused with the table's reason, and x is untouched."""
    p = fd.VP()
    net = _gaussian_net(p, "x0")
    x = p.prior(6, 2, seed=1, dtype=torch.float64)
    before = x.clone()
    calls = _count_affine_calls(monkeypatch)
    out = fd.sample(net, x=x, steps=5, method=method, seed=1, **options)
    assert calls == [] and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=f"{why}.*backend='cpu' has no kernel for it"):
        fd.sample(net, x=x, steps=5, method=method, seed=1, backend="cpu", **options)
    assert torch.equal(x, before)


@pytest.mark.filterwarnings("ignore::fastdiff.sampling.GridWarning")   # coarse grids on purpose
@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m_sde"])
def test_fd_sample_gaussian_mixture_multistep_is_fused_and_equals_the_executor(method, monkeypatch):
    """fd.GaussianMixture (an analytic denoiser, not a model wrapper) takes the fused affine-step loop too."""
    p = fd.VP()
    GM = fd.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[0.5, -1.0], [-1.0, 2.0]]),
                            torch.stack([0.3 * torch.eye(2), 0.5 * torch.eye(2)]), p)
    kw = dict(n=40, steps=10, method=method, seed=3, dtype=torch.float64, shape=2, backend="cpu")
    calls = _count_affine_calls(monkeypatch)
    got = fd.sample(GM, **kw)
    assert len(calls) == 10
    want = _executor_sample(monkeypatch, GM, **(kw | {"backend": "torch"}))
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_method_tables_are_memoised_per_process_and_grid():
    """fd.sample keeps the last few method tables (with their GridWarning variance): a repeated call reuses the
    table and gives the same bits, and still warns on a poor grid; another process, grid or option builds its
    own table (the first call's result is unchanged by the memo: compared with a cleared one)."""
    import warnings

    import fastdiff.sampling as S
    net = _gaussian_net(fd.VP(), "x0")
    kw = dict(n=6, shape=(2,), steps=12, method="dpmpp_2m_sde", seed=3, dtype=torch.float64)
    S._TABLE_MEMO.clear()
    first = fd.sample(net, **kw)
    assert len(S._TABLE_MEMO) == 1
    (key, (proc, table, var)), = S._TABLE_MEMO.items()
    assert proc is net.process and var == M.unit_gaussian_variance(table, net.process)
    assert torch.equal(fd.sample(net, **kw), first) and len(S._TABLE_MEMO) == 1
    fd.sample(net, **dict(kw, eta=0.5))
    fd.sample(net, **dict(kw, steps=13))
    other = _gaussian_net(fd.VP(beta_max=15.0), "x0")
    fd.sample(other, **kw)
    assert len(S._TABLE_MEMO) == 4
    assert not torch.equal(fd.sample(other, **kw), first)
    poor = dict(kw, steps=1)
    for _ in range(2):                                       # the memoised table still warns
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd.sample(net, **poor)
        assert any(issubclass(w.category, fd.GridWarning) for w in caught)
    S._TABLE_MEMO.clear()
    assert torch.equal(fd.sample(net, **kw), first)


@pytest.mark.parametrize("method,options", [("heun", {}), ("dpm_2", {}), ("dpm_2_ancestral", {}),
                                            ("dpmpp_sde", {"r": 0.3}), ("dpmpp_2s_ancestral", {})])
def test_a_network_returning_one_output_buffer_samples_as_one_returning_fresh_tensors(method, options):
    """A captured CUDA graph or an inference engine returns the same output tensor at every call: a step uses
    D_0 up before its stage's call overwrites it."""
    p = fd.VP()
    G = fd.Gaussian(MEAN, COV, p)
    buf = {}

    def static(x, t):
        D = G.denoise(x, float(t[0]))
        return buf.setdefault("out", torch.empty_like(D)).copy_(D)
    kw = dict(n=50, steps=8, method=method, seed=2, dtype=torch.float64, shape=2, **options)
    fresh = fd.sample(fd.from_model(lambda x, t: G.denoise(x, float(t[0])), p, "x0"), **kw)
    assert torch.equal(fd.sample(fd.from_model(static, p, "x0"), **kw), fresh)


def test_a_process_that_prints_like_the_denoisers_but_differs_is_refused():
    p1, p2 = fd.DriftedVE(beta=lambda t: t), fd.DriftedVE(beta=lambda t: 2 * t)
    assert repr(p1) == repr(p2)
    G = fd.Gaussian(MEAN, COV, p1)
    with pytest.raises(ValueError, match="differs from the denoiser's process.*different objects"):
        fd.sample(G, p2, n=4, steps=4)
    same = fd.Gaussian(MEAN, COV, fd.DriftedVE(beta="t"))
    assert fd.sample(same, fd.DriftedVE(beta="t"), n=4, steps=30, method="ei-x0").shape == (4, 2)


# ------------------------------------------------ coefficients at large σ̃ (a review against mpmath, 60 digits)
def test_ancestral_split_keeps_k_diffusions_bits_and_does_not_overflow():
    """k-diffusion's σ_up = min(σ', η·√(σ'²(σ² − σ'²)/σ²)) squares σ twice: formed in units of a power of two,
    the bits are its own in range, and σ̃ = 1e93 (the drifted VE's σ̃(T)) no longer gives σ_up = σ', σ_down = 0
    (silently: A = 0 on the first steps of DriftedVE(625, 't^2')), nor 1e200 an OverflowError."""
    for s_from, s_to, eta in [(80.0, 28.1, 1.0), (14.6, 5.0, 0.5), (3.3, 0.02, 1.2), (1e-3, 5e-4, 1.0)]:
        up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
        assert M._ancestral_split(s_from, s_to, eta) == ((s_to ** 2 - up ** 2) ** 0.5, up)
    for s_from in (1e93, 1e200, 1e300):
        down, up = M._ancestral_split(s_from, s_from / 10, 1.0)
        assert down == pytest.approx(s_from / 100, rel=1e-13, abs=0)
        assert up == pytest.approx(s_from / 10 * 0.99 ** 0.5, rel=1e-15, abs=0)
    t = M.method_table(fd.DriftedVE(T=625.0, beta="t^2"), fd.time_grid(fd.DriftedVE(T=625.0, beta="t^2"), 50),
                       "euler_ancestral")
    assert float(t.A[0]) == pytest.approx(0.01103472, rel=1e-6)            # mpmath (was 0)


def test_two_stage_coefficients_at_large_sigma_tilde():
    """VP(β_max = 2000): σ̃(T) ≈ 1.4e217, so σ̂·σ' overflowed in heun's and dpm_2's B_0 (NaN, the table refused)
    and the ancestral split raised OverflowError. Every table builds; heun's first step is mpmath's."""
    import mpmath as mp
    p = fd.VP(beta_min=0.1, beta_max=2000.0)
    g = torch.tensor([1.0, 0.9, 0.5, 1e-3], dtype=torch.float64)
    for m in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "heun", "dpm_2"):
        t = M.method_table(p, g, m)
        assert all(bool(torch.isfinite(c).all()) for c in (t.A, t.B, t.C)), m
    with mp.workdps(60):
        def st(t):
            t = mp.mpf(t)
            la = -(t * t * (mp.mpf(2000) - mp.mpf("0.1")) / 4 + t * mp.mpf("0.1") / 2)
            return mp.sqrt(-mp.expm1(2 * la)) / mp.exp(la), la
        (s0, _), (s1, la1) = st(1.0), st(0.9)
        b0 = float(mp.exp(la1) * (s1 - s0) * (s0 - 2 * s1) / (2 * s1 * s0))
    heun = M.method_table(p, g, "heun")
    assert float(heun.B[0, 0]) == pytest.approx(b0, rel=1e-12, abs=0)


def test_lifting_names_the_overflow_of_sigma_tilde():
    """α(T) < e^-709 puts σ̃ = σ/α beyond float64: the §3b methods say so (the message used to blame the grid's
    floor and advise ending it later), and point to the log-space methods, which run."""
    p = fd.OU(theta=80.0, g=1.0, T=10.0)
    g = fd.time_grid(p, 20)
    with pytest.raises(ValueError, match="σ/α overflows float64 at times\\[0\\]=10.0.*'ei' or 'ei-x0'"):
        M.method_table(p, g, "dpmpp_2m")
    assert bool(torch.isfinite(fd.step_table(p, g, "ei-x0").A).all())
