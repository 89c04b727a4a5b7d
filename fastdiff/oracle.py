"""Exact output law of a sampler on Gaussian data (MATH.md §6).

With Gaussian data the exact D is affine, D(x) = M_k x + c_k, so every step x ← A x + B D + C z is
affine with Gaussian noise, and the output law is Gaussian with
  μ ← (A + B M_k) μ + B c_k,   Σ ← (A + B M_k) Σ (A + B M_k)ᵀ + C² I,
started from the prior N(0, prior_std² I). No sampling error: exact KL-vs-step-size curves.
"""
from __future__ import annotations

import torch

from .denoisers import Gaussian
from .processes import Process
from .steps import METHODS, step_table


def gaussian_oracle(process: Process, times, method: str = "ei", ode: bool = False, mean=None, cov=None,
                    *, eta: float | None = None, final_denoise: bool = False, **method_options):
    """(mean [d], cov [d, d]) in float64 of the law `fd.sample` produces for data N(mean, cov).

    The multistep and two-stage methods of fastdiff.methods (MATH.md §3b) are covered too (their state
    (x, D history) is jointly Gaussian): `method_options` are theirs (s_noise=, s_churn=, solver_type=, ...),
    and the law is that of fastdiff.methods.sample_table with the contract noise.
    """
    if mean is None or cov is None:
        raise ValueError("gaussian_oracle needs the data law: pass mean=[d] and cov=[d, d]")
    data = Gaussian(mean, cov, process)
    if method not in METHODS:
        from .methods import method_table, table_oracle
        mtable = method_table(process, times, method, ode=ode, eta=eta, **method_options)
        return table_oracle(mtable, data, final_denoise=final_denoise)
    if method_options:
        raise TypeError(f"method {method!r} takes no option {', '.join(sorted(method_options))}")
    table = step_table(process, times, method, ode, eta)
    d = data.dim
    eye = torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    S = process.prior_std ** 2 * eye
    for k in range(len(table)):
        Mk, ck = data.linear_map(float(table.t[k]))
        A, B, C = float(table.A[k]), float(table.B[k]), float(table.C[k])
        P = A * eye + B * Mk
        mu = P @ mu + B * ck
        S = P @ S @ P.T + C * C * eye
    if final_denoise:
        Mk, ck = data.linear_map(float(table.times[-1]))
        mu, S = Mk @ mu + ck, Mk @ S @ Mk.T
    return mu, 0.5 * (S + S.T)
