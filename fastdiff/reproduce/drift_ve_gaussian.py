"""The drifted-VE paper's 2-D Gaussian study: KL(sampler output ‖ data) against the step size for the
aggressive drifted VE (β = t², τ = T²), the conservative drifted VE (β = t, τ = T²) and the pure VE
(σ² = t²), with Euler–Maruyama, the exponential integrator and the D-frozen exponential integrator.

The KL is exact: with Gaussian data every step is affine, so the output law is propagated in closed
form (``fd.gaussian_oracle``, MATH.md §6); a sampling run confirms it."""
from __future__ import annotations

import math

import torch

import fastdiff as fd

from ._common import Context, empirical_gaussian, fmt, plt, settings_list, table

DESCRIPTION = "drifted vs pure VE on a 2-D Gaussian, exact KL against the step size (drifted-VE paper)"

PROCESSES = {
    "aggressive drifted VE (β=t²)": lambda T: fd.DriftedVE(T=T, beta="t^2"),
    "conservative drifted VE (β=t)": lambda T: fd.DriftedVE(T=T, beta="t"),
    "pure VE (σ²=t²)": lambda T: fd.PureVE(T=T),
}
SHORT = dict(zip(PROCESSES, ("aggressive", "conservative", "pure"), strict=True))
METHODS = ("euler", "ei", "ei-x0")
T_END = 1e-3


def _oracle_kl(process, times, method, ode, mu, cov):
    try:
        m, c = fd.gaussian_oracle(process, times, method, ode, mu, cov)
        if not (torch.isfinite(m).all() and torch.isfinite(c).all()):
            return math.inf
        return fd.metrics.gaussian_kl(m, c, mu, cov)
    except ValueError:                # a step table that overflows float64, or a non-PSD law
        return math.inf


def experiment(ctx: Context) -> str:
    _, means, covs = fd.datasets.gaussian_2d_params()
    mu, cov = means[0], covs[0]
    Ts = ctx.pick([10.0], [10.0, 100.0], [10.0, 100.0, 625.0])
    hs = ctx.pick([2.0, 0.5], [2.0**k for k in range(2, -7, -1)], [2.0**k for k in range(2, -9, -1)])
    odes = ctx.pick([False], [False], [False, True])
    n_mc = ctx.pick(500, 20_000, 1_000_000)
    # the sampling check runs at T = 10 in quick mode (the KL at a given h hardly depends on T, see the
    # tables; T = 100 would cost 10x the steps)
    T_mc, h_mc = ctx.pick(10.0, 10.0, 100.0), ctx.pick(0.5, 0.25, 0.25)

    # --- exact KL against the step size (uniform grid from T to δ) --------------------------------
    curves = {}           # (T, ode, process, method) -> [(h, K, KL)]
    for T in Ts:
        for ode in odes:
            for pname, make in PROCESSES.items():
                process = make(T)
                for method in METHODS:
                    pts = []
                    for h in hs:
                        K = max(1, round((T - T_END) / h))
                        times = fd.time_grid(process, K, "uniform", T_END)
                        pts.append((h, K, _oracle_kl(process, times, method, ode, mu, cov)))
                    curves[(T, ode, pname, method)] = pts
            ctx.log(f"oracle T={T} ode={ode} done")

    # --- the forward-convergence term KL(p_T ‖ prior), where the drift is meant to help -------------
    prior_rows = []
    for T in Ts:
        row = [fmt(T)]
        for make in PROCESSES.values():
            p = make(T)
            a, s2 = p.alpha(T), p.sigma2(T)
            row.append(fd.metrics.gaussian_kl(a * mu, a * a * cov + s2 * torch.eye(2, dtype=torch.float64),
                                              torch.zeros(2), p.prior_std**2 * torch.eye(2)))
        prior_rows.append(row)

    # --- the same step budget on the exponential (log-uniform) grid ---------------------------------
    exp_rows, grid_ratios = [], []
    for T in Ts:
        K = int(4 * T)
        for method in METHODS:
            row = [fmt(T), K, method]
            for make in PROCESSES.values():
                p = make(T)
                kl_exp = _oracle_kl(p, fd.time_grid(p, K, "exponential", T_END), method, False, mu, cov)
                kl_uni = _oracle_kl(p, fd.time_grid(p, K, "uniform", T_END), method, False, mu, cov)
                row.append(kl_exp)
                grid_ratios.append(kl_uni / kl_exp)
            exp_rows.append(row)

    # --- confirmation by sampling --------------------------------------------------------------------
    K_mc = round((T_mc - T_END) / h_mc)
    mc_rows, mc = [], {}
    for pname, make in PROCESSES.items():
        process = make(T_mc)
        den = fd.Gaussian(mu, cov, process)
        times = fd.time_grid(process, K_mc, "uniform", T_END)
        for method in METHODS:
            om, oc = fd.gaussian_oracle(process, times, method, False, mu, cov)
            x = fd.sample(den, n=n_mc, times=times, method=method, seed=ctx.seed, dtype=torch.float64,
                          chunk_size=200_000)
            em, ec = empirical_gaussian(x)
            kl_oracle = fd.metrics.gaussian_kl(om, oc, mu, cov)
            kl_sampled = fd.metrics.gaussian_kl(em, ec, mu, cov)
            kl_vs_oracle = fd.metrics.gaussian_kl(em, ec, om, oc)
            mc[(SHORT[pname], method)] = (kl_oracle, kl_sampled, kl_vs_oracle)
            mc_rows.append([SHORT[pname], method, kl_oracle, kl_sampled, kl_vs_oracle])
        ctx.log(f"sampling check {SHORT[pname]} done")
    mc_bias = 2.5 / n_mc        # E KL(fitted Gaussian ‖ true law) ≈ (d + d(d+1)/2)/(2n) for d = 2
    mc_ok = all(abs(v[2]) < 10 * mc_bias + 1e-3 * v[0] for v in mc.values())

    # --- tables of the curves and the ordering -------------------------------------------------------
    sections = []
    order_stats = {"aggr<cons": 0, "cons<pure": 0, "aggr<pure": 0, "cells": 0}
    cons_pure_rel = []
    for T in Ts:
        for ode in odes:
            rows = []
            for h in hs:
                row = [fmt(h), round((T - T_END) / h)]
                for method in METHODS:
                    vals = [{hh: kl for hh, _, kl in curves[(T, ode, p, method)]}[h] for p in PROCESSES]
                    row += vals
                    a, c, pu = vals
                    if all(math.isfinite(v) for v in vals):
                        order_stats["cells"] += 1
                        order_stats["aggr<cons"] += a < c
                        order_stats["cons<pure"] += c < pu
                        order_stats["aggr<pure"] += a < pu
                        cons_pure_rel.append(abs(c - pu) / pu)
                rows.append(row)
            headers = ["h", "K"] + [f"{m}: {SHORT[p][:4]}" for m in METHODS for p in PROCESSES]
            sections.append(f"**T = {fmt(T)}, {'PF-ODE' if ode else 'reverse SDE'}** (KL, exact):\n\n"
                            + table(headers, rows))

    # --- figure ---------------------------------------------------------------------------------------
    P = plt()
    fig, axes = P.subplots(1, len(Ts), figsize=(4.6 * len(Ts), 4.0), squeeze=False)
    colors = dict(zip(PROCESSES, ("tab:red", "tab:blue", "tab:gray"), strict=True))
    widths = dict(zip(PROCESSES, (1.4, 1.2, 3.5), strict=True))
    alphas = dict(zip(PROCESSES, (1.0, 1.0, 0.45), strict=True))
    styles = dict(zip(METHODS, ("-", "--", ":"), strict=True))
    for ax, T in zip(axes[0], Ts, strict=True):
        for pname in reversed(list(PROCESSES)):
            for method in METHODS:
                pts = [(h, kl) for h, _, kl in curves[(T, False, pname, method)] if math.isfinite(kl) and kl > 0]
                if pts:
                    ax.loglog(*zip(*pts, strict=True), styles[method], color=colors[pname], marker="o", ms=3,
                              lw=widths[pname], alpha=alphas[pname], label=f"{SHORT[pname]}, {method}")
        if T == T_mc:
            for (pn, _method), (_, kl_s, _) in mc.items():
                name = next(k for k in PROCESSES if SHORT[k] == pn)
                ax.plot([h_mc], [max(kl_s, 1e-12)], "x", color=colors[name], ms=9, mew=2)
        ax.set_xlabel("step size h (uniform grid)")
        ax.set_ylabel("KL(output ‖ data), exact")
        ax.set_title(f"2-D Gaussian, reverse SDE, T = {fmt(T)}" + ("\n(× = sampled)" if T == T_mc else ""), fontsize=9)
        ax.set_ylim(1e-7, 1e3)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=1)
    fig.tight_layout()
    ctx.savefig(fig, "kl_vs_step_size.png")

    # --- verdict --------------------------------------------------------------------------------------
    cells = max(order_stats["cells"], 1)
    T0 = Ts[-1] if 100.0 not in Ts else 100.0
    h_small = min(hs)
    ratio = {m: [{hh: kl for hh, _, kl in curves[(T0, False, p, m)]}[h_small] for p in PROCESSES]
             for m in METHODS}
    h_big = max(hs)
    big = {m: [{hh: kl for hh, _, kl in curves[(T0, False, p, m)]}[h_big] for p in PROCESSES]
           for m in METHODS}
    exp_worse = sum(1 for r in exp_rows if r[3] > r[5])
    small_ok = all(ratio[m][0] < ratio[m][2] for m in METHODS)
    big_flip = [m for m in METHODS if big[m][0] > big[m][2]]
    flip_text = (f"But at large steps the order flips: at h = {fmt(h_big)} Euler gives {fmt(big['euler'][0])} "
                 f"(aggressive) vs {fmt(big['euler'][2])} (pure), because β = t² makes g² = 2t² and the drift large "
                 f"at t ≈ T, where a coarse step overshoots (flipped for {', '.join(big_flip)}). " if big_flip else "")
    label_aggr = ("**Agree**" if small_ok else "**Disagree**") + " at the smallest step" + (
        ", **disagree** for coarse steps." if big_flip else ".")
    median_rel = sorted(cons_pure_rel)[len(cons_pure_rel) // 2] if cons_pure_rel else float("nan")
    cons_gain = order_stats["cons<pure"] > cells / 2 and median_rel >= 0.05
    max_rel = max(cons_pure_rel) if cons_pure_rel else float("nan")
    ctx.results.update({
        "curves": {f"T={k[0]}|ode={k[1]}|{SHORT[k[2]]}|{k[3]}": v for k, v in curves.items()},
        "prior_kl": prior_rows, "sampling_check": {f"{a}|{b}": v for (a, b), v in mc.items()},
        "order_stats": order_stats, "cons_vs_pure_relative_difference": {"median": median_rel, "max": max_rel},
    })

    verdict = f"""
**What the paper claims** (Fig. on the 2-D Gaussian): the aggressive drifted VE gives the lowest KL,
then the conservative drifted VE, and the pure VE the highest, for both Euler–Maruyama and the
exponential integrator — the drift "balances the error terms".

**What we find** (exact KL, no sampling error; {order_stats['cells']} finite (T, h, method, SDE/ODE) cells):

- *aggressive vs the rest*: the aggressive drifted VE is below the conservative one in
  {order_stats['aggr<cons']}/{cells} cells and below pure VE in {order_stats['aggr<pure']}/{cells}. At the smallest
  step (h = {fmt(h_small)}, T = {fmt(T0)}) its KL is {fmt(ratio['euler'][0])} vs {fmt(ratio['euler'][2])} (pure) with
  Euler, {fmt(ratio['ei'][0])} vs {fmt(ratio['ei'][2])} with EI, {fmt(ratio['ei-x0'][0])} vs {fmt(ratio['ei-x0'][2])} \
with EI-x0.
  {flip_text}{label_aggr}
- *conservative vs pure*: the two are the same to a median relative difference of {fmt(median_rel)} (max
  {fmt(max_rel)}); conservative is lower in {order_stats['cons<pure']}/{cells} cells but by amounts far below anything
  a figure could show{"" if cons_gain else " (median relative difference below 5%)"}. On a uniform grid the KL is set \
by the last few
  steps near t = δ, where β = t, τ = T² gives α = e^{{−t²/2T²}} ≈ 1 and σ² ≈ t², i.e. exactly the pure VE.
  {"**Agree**: the conservative drift is lower in most cells by more than 5%." if cons_gain else
   "**Disagree**: we see no visible gain of the conservative drift over pure VE on this problem."}
- *where the drift does help*: the forward-convergence term KL(p_T ‖ prior), which the paper's
  theory is about, is smallest for the aggressive process, then conservative, then pure (table
  below) — the paper's ordering — but at T ≥ 100 it is ≤ \
{fmt(max([max(r[1:]) for r in prior_rows if float(r[0]) >= 100] or [float('nan')]))}, below the discretisation error at
  every step size we tried; only at T = 10 with tiny steps does it show in the total KL.
- *the grid matters more than the process*: on the log-uniform grid with the same number of steps
  (K = 4T) the KL is lower than on the uniform grid by a median factor {fmt(sorted(grid_ratios)[len(grid_ratios) // 2])}
  (range {fmt(min(grid_ratios))}–{fmt(max(grid_ratios))}; below 1 the uniform grid wins), and there the aggressive \
process is
  *worse* than pure VE in {exp_worse}/{len(exp_rows)} (T, method) cells (up to \
{fmt(max(r[3] / r[5] for r in exp_rows))}×){" — **disagreeing** with the paper's ordering" if exp_worse else
                                              " — the paper's ordering holds there too"}.
- the KL at fixed h hardly depends on T (compare the T tables): the error is made near t = 0.
- sampling confirms the oracle: {n_mc} samples per configuration at h = {fmt(h_mc)}, T = {fmt(T_mc)};
  KL(fitted Gaussian ‖ oracle law) is at the Monte Carlo level ≈ {fmt(mc_bias)} (check
  {'passed' if mc_ok else 'FAILED'}).
"""
    body = f"""
## Settings

{settings_list({
    "data": "N((1, −0.5), [[1, 0.6], [0.6, 0.5]]) (`fd.datasets.gaussian_2d_params`)",
    "processes": "DriftedVE(T, β=t², τ=T²), DriftedVE(T, β=t, τ=T²), PureVE(T)",
    "T": ", ".join(fmt(t) for t in Ts),
    "grid": f"uniform from T to δ = {T_END}, step size h, K = round((T − δ)/h) steps; output x_δ (no final denoise)",
    "methods": "euler (Euler–Maruyama), ei (exponential integrator, score frozen), ei-x0 (D frozen)",
    "dynamics": "reverse SDE" + (" and PF-ODE" if True in odes else ""),
    "KL": "KL(output law ‖ data law), exact Gaussian KL of `fd.gaussian_oracle` (MATH.md §6); inf = the step table "
          "overflows",
    "sampling check": f"`fd.sample` with the exact `fd.Gaussian` denoiser, {n_mc} samples, float64, T = {fmt(T_mc)}, h "
                      f"= {fmt(h_mc)}",
})}

## Verdict
{verdict}
![KL against step size](kl_vs_step_size.png)

## KL against step size

Columns: method: process (aggr = aggressive, cons = conservative drifted VE, pure = pure VE).

""" + "\n\n".join(sections) + f"""

## Forward convergence: KL(p_T ‖ prior)

{table(["T"] + [SHORT[p] for p in PROCESSES], prior_rows)}

## Same budget on the exponential (log-uniform) grid, K = 4T steps, reverse SDE

{table(["T", "K", "method"] + [SHORT[p] for p in PROCESSES], exp_rows)}

## Sampling confirms the oracle (T = {fmt(T_mc)}, h = {fmt(h_mc)}, {n_mc} samples)

{table(["process", "method", "KL oracle", "KL sampled (Gaussian fit)", "KL(fit ‖ oracle law)"], mc_rows)}

Expected Monte Carlo level of the last column: ≈ {fmt(mc_bias)}.
"""
    return body
