"""The kernel step table: one float64 layout that every backend's whole-trajectory op takes as it is.

Row k describes step k (k = 0..K−1), in the order the table executor (fastdiff.methods.run_table) runs it:

    x̂   = P x_k + Cchurn z_churn                          (churn; P = 1, Cchurn = 0 without it)
    D_k = D(x̂; alpha, sigma)                              (the point cloud's posterior mean)
    u   = Ux x̂ + UD D_k + Uz z_stage,  D_u = D(u; alphaU, sigmaU)       (a two-stage row: BU != 0)
    x_{k+1} = A x̂ + B0 D_k + B1 D_{k−1} + B2 D_{k−2} + BU D_u + C w,  w = rho z_stage + √(1 − rho²) z_k

z_k, z_stage and z_churn are the noise contract's draws at steps k, 2³¹ + k and 2³¹ + 2³⁰ + k (fastdiff.methods).
B1 and B2 are the multistep columns (DPM-Solver++(2M) and (3M), docs/math.md §3b). A row with P = 1 and
Cchurn = BU = rho = 0 is the one-step update x_{k+1} = A x_k + B0 D_k + C z_k (+ history) that euler / ei / ei-x0
and the multistep methods use; the kernels run such rows exactly as before the stage columns existed. t is the
process time of the row, kept for callbacks and reports.

The same column numbers are spelled out for the C++ and CUDA kernels in csrc/common/table.h;
tests/test_build.py checks that the two agree.
"""
from __future__ import annotations

import torch

COLUMNS = ("t", "alpha", "sigma", "A", "B0", "B1", "B2", "C", "P", "Cchurn", "alphaU", "sigmaU", "Ux", "UD", "Uz",
           "BU", "rho")
T, ALPHA, SIGMA, A, B0, B1, B2, C, P, CCHURN, ALPHA_U, SIGMA_U, UX, UD, UZ, BU, RHO = range(len(COLUMNS))
WIDTH = len(COLUMNS)
MULTISTEP = (B1, B2)
# the noise contract's steps of a row's stage and churn draws (csrc/common/table.h kStageStepBase, kChurnStepBase)
STAGE_STEP_BASE = 2**31
CHURN_STEP_BASE = 2**31 + 2**30
_DEFAULTS = {"P": 1.0}                  # every other missing column is 0


def pack(alpha, sigma, A, B0, C, *, t=None, B1=None, B2=None, **stages) -> torch.Tensor:
    """[K, WIDTH] float64 contiguous CPU tensor from per-step columns (tensors, sequences or numbers broadcast to
    K = len(A)); missing columns are 0, except P (1). The churn and stage columns by name: P, Cchurn, alphaU,
    sigmaU, Ux, UD, Uz, BU, rho."""
    unknown = set(stages) - set(COLUMNS[P:])
    if unknown:
        raise TypeError(f"pack: unknown table columns {sorted(unknown)} (the columns: {', '.join(COLUMNS)})")
    cols = {"alpha": alpha, "sigma": sigma, "A": A, "B0": B0, "C": C, "t": t, "B1": B1, "B2": B2, **stages}
    K = torch.as_tensor(A, dtype=torch.float64).reshape(-1).numel()
    table = torch.zeros(K, WIDTH, dtype=torch.float64)
    for name, value in _DEFAULTS.items():
        table[:, COLUMNS.index(name)] = value
    for name, value in cols.items():
        if value is not None:
            table[:, COLUMNS.index(name)] = torch.as_tensor(value, dtype=torch.float64).to("cpu").reshape(-1)
    return table


def uses_history(table: torch.Tensor) -> bool:
    """Whether any step uses D_{k−1} or D_{k−2} (a multistep table)."""
    return bool(table[:, B1:B2 + 1].any())


def row_is_one_step(row) -> bool:
    """Whether a table row (a sequence of WIDTH numbers) is a one-step row: no churn, no stage, rho = 0."""
    return row[P] == 1.0 and row[CCHURN] == 0.0 and row[BU] == 0.0 and row[RHO] == 0.0


def uses_stages(table: torch.Tensor) -> bool:
    """Whether any step churns (P != 1 or Cchurn != 0) or evaluates a second D (BU != 0) or correlates its noise
    with a stage's (rho != 0): the kernels then compile their stage code."""
    return bool((table[:, P] != 1).any() or table[:, [CCHURN, BU, RHO]].any())

