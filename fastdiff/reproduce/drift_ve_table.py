"""The drifted-VE paper's KL table: pure VE vs drifted VE (β = t, τ = T²) × T ∈ {100, 625} × reverse
SDE / PF-ODE × {1-D Gaussian mixture, swiss roll}, with exact analytic denoisers (the mixture itself;
the swiss roll as a 500-point kernel density with bandwidth 0.05, so its true density is known) and
KL(samples ‖ truth) by histogram against the true density."""
from __future__ import annotations

import math

import torch

import fastdiff as fd

from ._common import Context, fmt, plt, settings_list, table

DESCRIPTION = "pure vs drifted VE KL table, 1-D mixture and swiss roll, exact denoisers (drifted-VE paper)"

BANDWIDTH = 0.05**2          # kernel variance of the swiss-roll density (as in `fastdiff demo`)
N_POINTS = 500
GMM_RANGE, GMM_BINS = (-6.0, 6.0), 100
ROLL_RANGE, ROLL_BINS = ((-1.6, 1.6), (-1.6, 1.6)), 50
T_END = 1e-3


def _gmm_density(z: torch.Tensor) -> torch.Tensor:
    """p_0 of the 1-D mixture 0.2 N(−3, 0.5²) + 0.5 N(0, 0.5²) + 0.3 N(3, 0.5²) at z [k, 1]."""
    w, mu, cov = fd.datasets.gmm_1d_params()
    var = cov[:, 0, 0]
    logn = -0.5 * (z - mu[:, 0]) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(w) + logn, dim=1).exp()


def experiment(ctx: Context) -> str:
    n = ctx.pick(400, 10_000, 100_000)
    steps = ctx.pick(20, 200, 1000)
    Ts = ctx.pick([100.0], [100.0, 625.0], [100.0, 625.0])
    methods = ctx.pick(["euler"], ["euler"], ["euler", "ei"])
    n_floor_seeds = ctx.pick(2, 4, 4)
    schedule = "karras"

    w, mu, cov = fd.datasets.gmm_1d_params()
    roll = fd.datasets.swiss_roll(N_POINTS, seed=ctx.seed, dtype=torch.float64)
    kde = fd.PointCloud(roll, fd.PureVE(100.0), bandwidth=BANDWIDTH)       # p_0 does not depend on the process

    def roll_density(z):
        return kde.data_log_prob(z).exp()

    datasets = {
        "1-D GMM": {"denoiser": lambda p: fd.GaussianMixture(w, mu, cov, p), "density": _gmm_density,
                    "range": GMM_RANGE, "bins": GMM_BINS},
        "swiss roll": {"denoiser": lambda p: fd.PointCloud(roll.float(), p, bandwidth=BANDWIDTH),
                       "density": roll_density, "range": ROLL_RANGE, "bins": ROLL_BINS},
    }

    def exact_draws(name, seed):
        g = torch.Generator().manual_seed(10_000 + seed)
        if name == "1-D GMM":
            return fd.datasets.gmm_1d(n, seed=10_000 + seed, dtype=torch.float64)
        return roll[torch.randint(N_POINTS, (n,), generator=g)] + math.sqrt(BANDWIDTH) * torch.randn(
            n, 2, generator=g, dtype=torch.float64)

    # the floor of the histogram estimator: KL of exact draws of the truth, over a few seeds
    floors = {}
    for name, spec in datasets.items():
        vals = [fd.metrics.kl_histogram(exact_draws(name, s), density=spec["density"], bins=spec["bins"],
                                        range=spec["range"]) for s in range(n_floor_seeds)]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1))
        floors[name] = (m, sd)

    kl, samples = {}, {}
    for T in Ts:
        procs = {"pure VE": fd.PureVE(T), "drifted VE": fd.DriftedVE(T, beta="t")}
        for name, spec in datasets.items():
            for pname, p in procs.items():
                for ode in (False, True):
                    for method in methods:
                        x = fd.sample(spec["denoiser"](p), n=n, steps=steps, schedule=schedule, method=method,
                                      ode=ode, t_end=T_END, seed=ctx.seed)
                        kl[(T, name, pname, ode, method)] = fd.metrics.kl_histogram(
                            x.double(), density=spec["density"], bins=spec["bins"], range=spec["range"])
                        samples[(T, name, pname, ode, method)] = x[:5000]
            ctx.log(f"T={T} {name} done")

    # --- the paper-style table ----------------------------------------------------------------------
    rows, diffs = [], []
    for T in Ts:
        for ode in (False, True):
            for method in methods:
                row = [fmt(T), "PF-ODE" if ode else "reverse SDE", method]
                for name in datasets:
                    a, b = kl[(T, name, "pure VE", ode, method)], kl[(T, name, "drifted VE", ode, method)]
                    row += [a, b]
                    diffs.append((name, a - b))
                rows.append(row)
    headers = ["T", "reverse process", "method"] + [f"{d}: {p}" for d in datasets for p in ("pure VE", "drifted VE")]

    resolved = {name: 2 * math.sqrt(2) * floors[name][1] for name in datasets}     # ~2σ of a difference
    drift_better = sum(1 for name, dlt in diffs if dlt > 0)
    sig_better = sum(1 for name, dlt in diffs if dlt > resolved[name])
    sig_worse = sum(1 for name, dlt in diffs if -dlt > resolved[name])
    per_ds = {name: (sum(1 for nm, dlt in diffs if nm == name and dlt > 0), sum(1 for nm, _ in diffs if nm == name))
              for name in datasets}
    max_gap = {name: max(abs(dlt) for nm, dlt in diffs if nm == name) for name in datasets}
    # how far each kind of cell sits above the floor of exact draws (both processes pooled)
    excess = {(name, ode): max(kl[(T, name, pn, ode, m)] - floors[name][0]
                               for T in Ts for pn in ("pure VE", "drifted VE") for m in methods)
              for name in datasets for ode in (False, True)}
    best_for_drift = max((dlt for _, dlt in diffs), default=0.0)
    if sig_better > sig_worse:
        conclusion = (f"**Partly agree**: the drifted VE is resolvably better in {sig_better} cell(s) (by up to "
                      f"{fmt(best_for_drift)} nats) and resolvably worse in {sig_worse}.")
    else:
        conclusion = (f"**Disagree: we do not reproduce a clear gap** — the largest difference in the paper's "
                      f"direction is {fmt(best_for_drift)} nats, and resolvable differences go {sig_better} for and "
                      f"{sig_worse} against the drifted VE; with the exact score the drift is not a property that "
                      f"improves sampling on this grid.")
    excess_text = "; ".join(f"{name}: reverse SDE up to {fmt(excess[(name, False)])}, "
                            f"PF-ODE up to {fmt(excess[(name, True)])}"
                            for name in datasets)

    # --- figure: the paper's two figures (1-D GMM, T = 625, PF-ODE; swiss roll, T = 100, reverse SDE) ----
    P = plt()
    fig, axes = P.subplots(2, 3, figsize=(11, 7))
    T_hi, T_lo, m0 = Ts[-1], Ts[0], methods[0]
    zz = torch.linspace(*GMM_RANGE, 400, dtype=torch.float64).unsqueeze(1)
    ax = axes[0][0]
    ax.plot(zz[:, 0], _gmm_density(zz), "k")
    ax.hist(exact_draws("1-D GMM", 0)[:, 0].numpy(), bins=GMM_BINS, range=GMM_RANGE, density=True, alpha=0.5)
    ax.set_title(f"1-D GMM: exact draws (KL floor {fmt(floors['1-D GMM'][0])})", fontsize=9)
    for ax, pname in zip(axes[0][1:], ("pure VE", "drifted VE"), strict=True):
        key = (T_hi, "1-D GMM", pname, True, m0)
        ax.plot(zz[:, 0], _gmm_density(zz), "k")
        ax.hist(samples[key][:, 0].numpy(), bins=GMM_BINS, range=GMM_RANGE, density=True, alpha=0.5,
                color="tab:blue" if pname == "pure VE" else "tab:red")
        ax.set_title(f"{pname}, T = {fmt(T_hi)}, PF-ODE, {m0}: KL {fmt(kl[key])}", fontsize=9)
    ex = exact_draws("swiss roll", 0)[:5000]
    panels = [(f"swiss roll: exact draws (KL floor {fmt(floors['swiss roll'][0])})", ex, "k")]
    for pname in ("pure VE", "drifted VE"):
        key = (T_lo, "swiss roll", pname, False, m0)
        panels.append((f"{pname}, T = {fmt(T_lo)}, reverse SDE, {m0}: KL {fmt(kl[key])}", samples[key],
                       "tab:blue" if pname == "pure VE" else "tab:red"))
    for ax, (title, x, c) in zip(axes[1], panels, strict=True):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1, alpha=0.4, color=c, rasterized=True)
        ax.set_xlim(*ROLL_RANGE[0])
        ax.set_ylim(*ROLL_RANGE[1])
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    ctx.savefig(fig, "samples.png")

    ctx.results.update({"kl": {f"T={k[0]}|{k[1]}|{k[2]}|{'ode' if k[3] else 'sde'}|{k[4]}": v for k, v in kl.items()},
                        "floors": floors})
    floor_rows = [[name, floors[name][0], floors[name][1], resolved[name]] for name in datasets]
    return f"""
## Settings

{settings_list({
    "processes": "PureVE(T) (σ² = t²) and DriftedVE(T, β = t, τ = T²) (the paper's drifted VESDE)",
    "T": ", ".join(fmt(t) for t in Ts),
    "data": "1-D GMM 0.2 N(−3, 0.5²) + 0.5 N(0, 0.5²) + 0.3 N(3, 0.5²) (exact `GaussianMixture` denoiser); swiss "
            f"roll: {N_POINTS} points (seed {ctx.seed}) as a kernel density with bandwidth 0.05 (exact "
            "`PointCloud(bandwidth=0.05²)` denoiser)",
    "sampler": f"{', '.join(methods)} (the paper: Euler–Maruyama), {steps} steps on the `{schedule}` grid (ρ = 7) from "
               f"T to δ = {T_END}, output x_δ; reverse SDE and PF-ODE",
    "samples": f"{n} per cell, seed {ctx.seed}",
    "KL": f"KL(samples ‖ true density) by histogram (`fd.metrics.kl_histogram`): GMM {GMM_BINS} bins on {GMM_RANGE}, "
          f"swiss roll {ROLL_BINS}×{ROLL_BINS} on [−1.6, 1.6]², true bin masses by Gauss–Legendre, empty-bin floor "
          "1e−12",
})}

## KL table

{table(headers, rows)}

Histogram floor (KL of {n} exact draws of the truth, mean ± sd over {n_floor_seeds} seeds) and the smallest
difference between two cells that this noise resolves (≈ 2√2 sd; conservative for pure vs drifted, which
share the sampler's seed and so differ by less noise than two independent cells):

{table(["data", "floor (mean)", "sd", "resolvable difference"], floor_rows)}

## Verdict

**What the paper claims**: the drifted VESDE gives lower KL than the pure VESDE in (nearly) every cell of
this table, for both T, both reverse processes and both data sets.

**What we find**: the drifted VE is lower in {drift_better}/{len(diffs)} cells \
({per_ds['1-D GMM'][0]}/{per_ds['1-D GMM'][1]} on the GMM,
{per_ds['swiss roll'][0]}/{per_ds['swiss roll'][1]} on the swiss roll), but the differences exceed the estimator's \
noise in
only {sig_better} cell(s) in the paper's direction and {sig_worse} cell(s) in the other; the largest
|pure − drifted| gap is {fmt(max_gap['1-D GMM'])} on the GMM and {fmt(max_gap['swiss roll'])} on the swiss roll,
against floors of {fmt(floors['1-D GMM'][0])} and {fmt(floors['swiss roll'][0])}. With exact denoisers and a
{steps}-step `{schedule}` grid the cells exceed the floor of exact draws by ({excess_text}), against a
resolvable difference of {fmt(resolved['1-D GMM'])} (GMM) and {fmt(resolved['swiss roll'])} (swiss roll): what error
there is can only come from the discretisation and the early stop at δ. {conclusion} The paper's
networks were trained; an improvement may come from score-estimation error interacting with the
process (not testable with exact scores) or from a coarser discretisation. (On a uniform grid both
processes fail alike; see `drift-ve-gaussian`, where the error sits in the last steps near t = 0, where
β = t makes the drifted process equal to pure VE.)

![samples](samples.png)
"""
