"""The CEM paper's analytic tests: point clouds of 5 and 20 points and the singular "line" distribution,
sampled with their exact denoisers on the uniform, quadratic and exponential grids (OU(½, 1), T = 10,
t₁ = 1e−4, then one last step to t = 0): recovered point weights, distance to the support, and how
the score and ε targets blow up near t = 0 while the conditional expectation D stays bounded."""
from __future__ import annotations

import itertools
import math

import torch

import fastdiff as fd

from ._common import Context, fmt, plt, settings_list, table

DESCRIPTION = "point clouds and the line with exact denoisers: uniform vs quadratic vs exponential grids (CEM paper)"

SCHEDULES = ("uniform", "quadratic", "exponential")
T1 = 1e-4
E_PERP = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)     # normal of the line x₁ = x₂
E_LINE = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)


def _chi2_sf(stat: float, dof: int):
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, dof))
    except ImportError:                              # scipy is optional
        return None


def _kl_1d(m, v, m0, v0):
    """KL(N(m, v) ‖ N(m0, v0)) for scalars."""
    if v <= 0:
        return math.inf
    return 0.5 * (v / v0 + (m - m0) ** 2 / v0 - 1 + math.log(v0 / v))


def _rms(v):
    """Root mean square over rows of the Euclidean norm of v [m, d]."""
    return float(v.pow(2).sum(1).mean().sqrt())


def _targets(den, x, t):
    """(score, ε, D) of an exact denoiser at x [m, 2], scalar t, in float64."""
    x = x.double()
    return den.score(x, t).double(), den.eps(x, t).double(), den.denoise(x, t).double()


def experiment(ctx: Context) -> str:
    process = fd.OU(theta=0.5, g=1.0, T=10.0)
    n = ctx.pick(500, 10_000, 100_000)
    Ks = ctx.pick([20], [50, 200], [50, 200, 1000])
    methods = ctx.pick(["ei", "ei-x0"], ["euler", "ei", "ei-x0"], ["euler", "ei", "ei-x0"])
    m_mc = ctx.pick(200, 4000, 20_000)
    g = torch.Generator().manual_seed(ctx.seed)
    clouds = {N: torch.randn(N, 2, generator=g, dtype=torch.float64) for N in (5, 20)}
    _, lmu, lcov = fd.datasets.line_params()
    line = fd.Gaussian(lmu[0], lcov[0], process)

    # --- 1. sampling the point clouds on each grid --------------------------------------------------
    cloud_rows, cloud_res, table1 = [], {}, None
    for N, y in clouds.items():
        den = fd.PointCloud(y.float(), process)
        for K in Ks:
            for sched in SCHEDULES:
                times = fd.time_grid(process, K, sched, T1, append_zero=True)
                for method in methods:
                    x = fd.sample(den, n=n, times=times, method=method, seed=ctx.seed)
                    w = fd.metrics.recovered_weights(x, y)
                    counts = w * n
                    chi2 = float(((counts - n / N) ** 2 / (n / N)).sum())
                    dist = fd.metrics.distance_to_support(x, y)
                    res = {"tv": 0.5 * float((w - 1 / N).abs().sum()), "chi2_dof": chi2 / (N - 1),
                           "p": _chi2_sf(chi2, N - 1), "d_mean": float(dist.mean()),
                           "d_99": float(dist.quantile(0.99)), "d_max": float(dist.max()),
                           "mem": fd.metrics.memorisation_ratio(x, y), "weights": w.tolist()}
                    cloud_res[(N, K, sched, method)] = res
                    cloud_rows.append([N, K, sched, method, res["tv"], res["chi2_dof"], res["p"], res["d_mean"],
                                       res["d_99"], res["d_max"], res["mem"]])
                    if N == 5 and sched == "exponential" and method == "ei" and K == max(Ks):
                        table1 = res["weights"]
            ctx.log(f"{N} points, K={K} done")
    # the Monte Carlo level of the total variation for exact multinomial draws
    tv_mc, tv_sd = {}, {}
    for N in clouds:
        draws = torch.multinomial(torch.full((N,), 1 / N), n * 200, replacement=True, generator=g).view(200, n)
        freq = torch.stack([torch.bincount(d, minlength=N) for d in draws]).double() / n
        tvs_mc = 0.5 * (freq - 1 / N).abs().sum(1)
        tv_mc[N] = float(tvs_mc.mean())
        tv_sd[N] = float(tvs_mc.std())

    # --- 2. the line: exact output law by the Gaussian oracle ----------------------------------------
    line_rows, line_res = [], {}
    for K in Ks:
        for sched in SCHEDULES:
            times = fd.time_grid(process, K, sched, T1, append_zero=True)
            for method in methods:
                mo, co = fd.gaussian_oracle(process, times, method, False, lmu[0], lcov[0])
                rms_perp = math.sqrt(max(float(E_PERP @ co @ E_PERP) + float(E_PERP @ mo) ** 2, 0.0))
                kl_along = _kl_1d(float(E_LINE @ mo), float(E_LINE @ co @ E_LINE), 0.0, 2.0)
                line_res[(K, sched, method)] = (rms_perp, kl_along)
                line_rows.append([K, sched, method, rms_perp, kl_along])
    x = fd.sample(line, n=n, times=fd.time_grid(process, max(Ks), "exponential", T1, append_zero=True),
                  method="ei", seed=ctx.seed)
    line_check = (float((x.double() @ E_PERP).pow(2).mean().sqrt()),
                  line_res[(max(Ks), "exponential", "ei")][0])
    t1_rows = []
    for t1 in (1e-2, 1e-3, 1e-4, 1e-5):
        times = fd.time_grid(process, max(Ks), "exponential", t1, append_zero=True)
        row = [t1]
        for method in methods:
            mo, co = fd.gaussian_oracle(process, times, method, False, lmu[0], lcov[0])
            row += [math.sqrt(max(float(E_PERP @ co @ E_PERP), 0.0)),
                    _kl_1d(float(E_LINE @ mo), float(E_LINE @ co @ E_LINE), 0.0, 2.0)]
        t1_rows.append(row)
    ctx.log("line done")

    # --- 3. the singularity: size of the targets as t → 0 --------------------------------------------
    dens = {"5 points": fd.PointCloud(clouds[5], process), "20 points": fd.PointCloud(clouds[20], process),
            "line": line}
    samplers = {"5 points": lambda m: clouds[5][torch.randint(5, (m,), generator=g)],
                "20 points": lambda m: clouds[20][torch.randint(20, (m,), generator=g)],
                "line": lambda m: torch.randn(m, 1, generator=g, dtype=torch.float64).expand(m, 2)}
    x_star = torch.tensor([[1.0, 0.0]], dtype=torch.float64)      # off every support (a.s. for the clouds)
    ts = torch.logspace(-4, 1, ctx.pick(6, 11, 21), dtype=torch.float64).tolist()
    sing = {}
    for name, den in dens.items():
        rows = []
        for t in ts:
            x0 = samplers[name](m_mc)
            xt = process.alpha(t) * x0 + process.sigma(t) * torch.randn(m_mc, 2, generator=g, dtype=torch.float64)
            s, e, D = _targets(den, xt, t)
            ps, pe, pD = _targets(den, x_star, t)
            rows.append((t, process.sigma(t), _rms(s), _rms(e), _rms(D), float(ps.norm()), float(pe.norm()),
                         float(pD.norm())))
        sing[name] = rows

    def slope(rows, col):
        pts = [(math.log(r[1]), math.log(r[col])) for r in rows if r[0] <= 1e-2 and r[col] > 0]
        if len(pts) < 2:
            return float("nan")
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)

    slope_rows = [[name] + [slope(rows, c) for c in range(2, 8)] for name, rows in sing.items()]

    # --- 4. how much each target moves within one step of each grid ---------------------------------
    K0 = max(Ks)
    frozen, frozen_rows = {}, []
    for name, den in dens.items():
        for sched in SCHEDULES:
            times = fd.time_grid(process, K0, sched, T1).tolist()
            per_step = []
            for tk, tn in itertools.pairwise(times):
                x0 = samplers[name](ctx.pick(100, 500, 2000))
                xt = (process.alpha(tk) * x0
                      + process.sigma(tk) * torch.randn(x0.shape[0], 2, generator=g, dtype=torch.float64))
                a = _targets(den, xt, tk)
                b = _targets(den, xt, tn)
                per_step.append((tk, [float((u - v).pow(2).sum(1).mean().sqrt()
                                            / v.pow(2).sum(1).mean().sqrt().clamp_min(1e-300))
                                      for u, v in zip(a, b, strict=True)]))
            frozen[(name, sched)] = per_step
            frozen_rows.append([name, sched] + [max(r[1][i] for r in per_step) for i in (0, 2)]
                               + [per_step[-1][1][i] for i in (0, 2)])
    ctx.log("singularity done")

    # --- figure ----------------------------------------------------------------------------------------
    P = plt()
    fig, axes = P.subplots(2, 2, figsize=(10, 8))
    ax = axes[0][0]
    width = 0.27
    for i, sched in enumerate(SCHEDULES):
        w = cloud_res[(20, K0, sched, "ei")]["weights"]
        ax.bar([j + (i - 1) * width for j in range(20)], w, width=width,
               label=f"{sched} (TV {fmt(cloud_res[(20, K0, sched, 'ei')]['tv'])})")
    ax.axhline(1 / 20, color="k", lw=1)
    ax.set_title(f"20-point cloud: recovered weights, K = {K0}, ei, n = {n}", fontsize=9)
    ax.set_xlabel("data point")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    y = clouds[20]
    xs = fd.sample(fd.PointCloud(y.float(), process), n=min(n, 3000),
                   times=fd.time_grid(process, K0, "uniform", T1, append_zero=True), method="ei-x0", seed=ctx.seed)
    xe = fd.sample(fd.PointCloud(y.float(), process), n=min(n, 3000),
                   times=fd.time_grid(process, K0, "exponential", T1, append_zero=True), method="ei-x0", seed=ctx.seed)
    ax.scatter(xs[:, 0], xs[:, 1], s=3, alpha=0.4, label="uniform grid", color="tab:blue", rasterized=True)
    ax.scatter(xe[:, 0], xe[:, 1], s=3, alpha=0.4, label="exponential grid", color="tab:red", rasterized=True)
    ax.scatter(y[:, 0], y[:, 1], s=30, facecolors="none", edgecolors="k", label="data")
    ax.set_title(f"20 points, ei-x0, K = {K0}: samples off the data "
                 f"(uniform: {fmt(1 - cloud_res[(20, K0, 'uniform', 'ei-x0')]['mem'])} not memorised)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_aspect("equal")
    ax = axes[1][0]
    rows = sing["line"]
    for col, lab, c in ((2, "score s (RMS over p_t)", "tab:red"), (3, "ε (RMS)", "tab:orange"),
                        (4, "D (RMS)", "tab:green"), (5, "score at x* = (1, 0)", "tab:red"),
                        (6, "ε at x*", "tab:orange"), (7, "D at x*", "tab:green")):
        ax.loglog([r[0] for r in rows], [r[col] for r in rows], "-" if col < 5 else "--", color=c, label=lab,
                  marker=".")
    ax.set_xlabel("t")
    ax.set_title("line distribution: size of the targets (dashed: off the line)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for sched, c in zip(SCHEDULES, ("tab:blue", "tab:orange", "tab:red"), strict=True):
        per = frozen[("line", sched)]
        ax.loglog([r[0] for r in per], [max(r[1][0], 1e-12) for r in per], "-", color=c, label=f"score, {sched}")
        ax.loglog([r[0] for r in per], [max(r[1][2], 1e-12) for r in per], ":", color=c, label=f"D, {sched}")
    ax.set_xlabel("t (start of step)")
    ax.set_title(f"line: relative L2 change of the target over one step (K = {K0})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    ctx.savefig(fig, "cem_schedules.png")

    # --- verdict ------------------------------------------------------------------------------------------
    def best_sched(N, K, method):
        return min(SCHEDULES, key=lambda s: cloud_res[(N, K, s, method)]["tv"])

    wins = [best_sched(N, K, m) for N in clouds for K in Ks for m in methods]
    exp_wins = wins.count("exponential")
    cells = [(N, K, m) for N in clouds for K in Ks for m in methods]

    def tv(c, sch):
        return cloud_res[(c[0], c[1], sch, c[2])]["tv"]

    unif_worst = sum(1 for c in cells if tv(c, "uniform") > max(tv(c, "quadratic"), tv(c, "exponential")))
    # a TV difference is resolved when it exceeds ~2 sd of a difference of two independent TVs
    res_tv = {N: 2 * math.sqrt(2) * tv_sd[N] for N in clouds}
    exp_beats_quad = sum(1 for c in cells if tv(c, "quadratic") - tv(c, "exponential") > res_tv[c[0]])
    quad_beats_exp = sum(1 for c in cells if tv(c, "exponential") - tv(c, "quadratic") > res_tv[c[0]])
    tvs = {s: [cloud_res[(N, K0, s, "ei")]["tv"] for N in clouds] for s in SCHEDULES}
    line_kl = {s: line_res[(K0, s, "ei")][1] for s in SCHEDULES}
    line_best = min(SCHEDULES, key=line_kl.get)
    paper_tv = 0.5 * sum(abs(f - 0.2) for f in (0.2086, 0.1924, 0.2092, 0.1977, 0.1921))
    tv5 = cloud_res[(5, K0, "exponential", "ei")]["tv"]
    ok5 = tv5 <= tv_mc[5] + 2 * tv_sd[5]                      # consistent with exact multinomial sampling

    def pvals(sch):
        return [cloud_res[(*c[:2], sch, c[2])]["p"] for c in cells]

    rejects = {sch: sum(1 for v in pvals(sch) if v is not None and v < 0.01) for sch in SCHEDULES}
    parts = [unif_worst == len(cells), exp_beats_quad > 0 and quad_beats_exp == 0, line_best == "exponential"]
    label_ii = "agree" if all(parts) else ("partly agree" if any(parts) else "disagree")
    sl_line = {row[0]: row[1:] for row in slope_rows}["line"]
    ok_iii = abs(sl_line[3] + 2) < 0.2 and abs(sl_line[4] + 1) < 0.2 and abs(sl_line[5]) < 0.1
    sl = {row[0]: row[1:] for row in slope_rows}
    ctx.results.update({
        "point_clouds": {f"N={k[0]}|K={k[1]}|{k[2]}|{k[3]}": v for k, v in cloud_res.items()},
        "tv_monte_carlo": tv_mc, "line": {f"K={k[0]}|{k[1]}|{k[2]}": v for k, v in line_res.items()},
        "t1_sweep": t1_rows, "singularity": sing, "slopes": slope_rows,
        "table1_weights": table1,
    })
    verdict = f"""
**What the paper claims**: (i) with the exact conditional expectation the sampler recovers the five
points with their weights (its Table 1: 0.2086, 0.1924, 0.2092, 0.1977, 0.1921 from 10 000 samples);
(ii) the exponential schedule samples best, the quadratic one is close but slightly worse, the uniform
one worst; (iii) the score blows up as t → 0 off the data manifold (like 1/σ², Theorem 3.5) while
the conditional expectation D stays bounded; smaller t₁ gives smaller errors.

**What we find**:
- (i) **{"agree" if ok5 else "disagree"}**. Five points, exponential grid, K = {max(Ks)}, ei: recovered weights
  {", ".join(f"{v:.4f}" for v in (table1 or []))}; total variation {fmt(tv5)}
  against {fmt(tv_mc[5])} ± {fmt(tv_sd[5])} expected from {n} exact multinomial draws (the paper's own Table 1 has
  TV {fmt(paper_tv)} from its 10 000 samples).
- (ii) **{label_ii}**. The uniform grid is the worst of the three on the point clouds in {unif_worst}/{len(cells)}
  (points, K, method) cells; at K = {K0} with ei the TV is {fmt(tvs['uniform'][0])} / {fmt(tvs['quadratic'][0])} / \
{fmt(tvs['exponential'][0])}
  (5 points) and {fmt(tvs['uniform'][1])} / {fmt(tvs['quadratic'][1])} / {fmt(tvs['exponential'][1])} (20 points) for \
uniform / quadratic / exponential
  (Monte Carlo level {fmt(tv_mc[5])} ± {fmt(tv_sd[5])} and {fmt(tv_mc[20])} ± {fmt(tv_sd[20])}); the χ² test (p < \
0.01) rejects exact weights in
  {rejects['uniform']} / {rejects['quadratic']} / {rejects['exponential']} of the {len(cells)} cells per grid (uniform \
/ quadratic / exponential). Exponential vs quadratic: the exponential grid is the best of the three in \
{exp_wins}/{len(wins)} cells, but the
  difference exceeds the Monte Carlo resolution (≈ 2√2 sd) in only {exp_beats_quad} cell(s) in its favour and
  {quad_beats_exp} against, so "quadratic slightly inferior" is **not resolved** at n = {n}. On the line (exact
  law by the oracle, ei, K = {K0}) the along-line KL is {fmt(line_kl['uniform'])} / {fmt(line_kl['quadratic'])} / \
{fmt(line_kl['exponential'])}
  (uniform / quadratic / exponential): the {line_best} grid is \
best{"" if line_best == "exponential" else
      f" and the exponential one is {fmt(line_kl['exponential'] / line_kl[line_best])}× worse"
      " — **disagree** for this distribution"}.
  The *distance to the support* does not depend on the grid for euler and ei: it is set by the noise
  of the last step from t₁ to 0 (√(1 − e^(−t₁)) ≈ {fmt(math.sqrt(-math.expm1(-T1)))}); ei-x0, which steps to σ = 0 \
exactly, lands on
  the data (distance ~1e−7, float32) except for samples the uniform grid leaves between points. Smaller
  t₁ shrinks that distance as √t₁ (t₁ table), as the paper says.
- (iii) **{"agree" if ok_iii else "disagree"}**. Fitted exponents in σ for t ≤ 1e−2 (table below): at the fixed \
off-support point the
  score grows like σ^{fmt(sl['line'][3])} (theory −2), ε like σ^{fmt(sl['line'][4])} (theory −1) and D like
  σ^{fmt(sl['line'][5])} (bounded); averaged over p_t the score grows like σ^{fmt(sl['line'][0])} (−1), ε and D stay \
O(1).
  Over one step the score changes by up to {fmt(max(r[1][0] for r in frozen[('line', 'uniform')]))}× its size on the \
uniform grid and
  {fmt(max(r[1][0] for r in frozen[('line', 'exponential')]))}× on the exponential one (eq. (41) equalises the drift \
per step, as designed), while D
  changes by at most {fmt(max(r[1][2] for r in frozen[('line', 'uniform')]))} (uniform) and \
{fmt(max(r[1][2] for r in frozen[('line', 'exponential')]))} (exponential): D is the smooth
  target, but the exponential grid's few large steps at large t are where D moves most.
"""
    return f"""
## Settings

{settings_list({
    "process": "OU(θ = ½, g = 1), T = 10 (α = e^(−t/2), σ² = 1 − e^(−t)), prior N(0, I)",
    "data": f"point clouds of 5 and 20 points drawn from N(0, I₂) (seed {ctx.seed}), equal weights (`fd.PointCloud`, "
            "bandwidth 0); the line N(0, [[1, 1], [1, 1]]) (`fd.Gaussian`, singular)",
    "grids": f"uniform, quadratic, exponential (eq. (41)) with K ∈ {Ks} steps from T to t₁ = {T1}, then one step to 0 "
             "(D never evaluated at 0)",
    "methods": ", ".join(methods) + " (reverse SDE); ei is closest to the paper's splitting scheme",
    "samples": f"{n} per configuration (the paper: 10 000)",
    "metrics": "recovered weights (nearest data point), total variation to 1/N and χ²/(N−1) (≈ 1 for exact weights), "
               "distance to the nearest data point, memorisation ratio (nearest < ⅓ second nearest); for the line the "
               "exact output law from `fd.gaussian_oracle`",
})}

## Verdict
{verdict}
![CEM schedules](cem_schedules.png)

## Point clouds

{table(["N", "K", "grid", "method", "TV", "χ²/dof", "p", "mean dist", "99% dist", "max dist", "memorised"], cloud_rows)}

Total variation expected from exact multinomial sampling at n = {n}: {fmt(tv_mc[5])} (5 points), {fmt(tv_mc[20])} (20 \
points).

## The line (exact, by the Gaussian oracle)

RMS distance to the line and KL of the along-line marginal against N(0, 2):

{table(["K", "grid", "method", "RMS distance", "KL along the line"], line_rows)}

Sampling check (exponential grid, K = {max(Ks)}, ei, {n} samples): RMS distance {fmt(line_check[0])} sampled vs \
{fmt(line_check[1])} exact.

Effect of t₁ (exponential grid, K = {max(Ks)}): RMS distance and along-line KL per method:

{table(["t₁"] + [f"{m}: {q}" for m in methods for q in ("RMS dist", "KL along")], t1_rows)}

## The singularity near t = 0

Fitted exponent p in |target| ∝ σ^p over t ≤ 1e−2 (RMS over p_t; and at the off-support point x* = (1, 0)):

{table(["data", "score RMS", "ε RMS", "D RMS", "score at x*", "ε at x*", "D at x*"], slope_rows)}

Relative L2 change of the target over one step of each grid (K = {K0}; max over all steps, and the last step to t₁):

{table(["data", "grid", "score: max", "D: max", "score: last step", "D: last step"], frozen_rows)}
"""
