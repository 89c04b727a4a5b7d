"""The kernel step table: one float64 layout that every backend's whole-trajectory op takes as it is.

Row k describes step k (k = 0..K−1) of  x_{k+1} = A x_k + B0 D_k + B1 D_{k−1} + B2 D_{k−2} + C z_k,
with D_k the point cloud's posterior mean at (alpha_k, sigma_k) and z_k the noise contract's draw at step k.
B1 and B2 are the multistep columns (DPM-Solver++(2M) and (3M), docs/math.md §3b); they are 0 for the
one-step methods (euler, ei, ei-x0). t is the process time of the row, kept for callbacks and reports.

The same column numbers are spelled out for the C++ and CUDA kernels in csrc/common/table.h;
tests/test_build.py checks that the two agree.
"""
from __future__ import annotations

import torch

COLUMNS = ("t", "alpha", "sigma", "A", "B0", "B1", "B2", "C")
T, ALPHA, SIGMA, A, B0, B1, B2, C = range(len(COLUMNS))
WIDTH = len(COLUMNS)
MULTISTEP = (B1, B2)


def pack(alpha, sigma, A, B0, C, *, t=None, B1=None, B2=None) -> torch.Tensor:
    """[K, WIDTH] float64 contiguous CPU tensor from per-step columns (tensors, sequences or numbers
    broadcast to K = len(A)); missing t, B1, B2 are 0."""
    cols = {"alpha": alpha, "sigma": sigma, "A": A, "B0": B0, "C": C, "t": t, "B1": B1, "B2": B2}
    K = torch.as_tensor(A, dtype=torch.float64).reshape(-1).numel()
    table = torch.zeros(K, WIDTH, dtype=torch.float64)
    for name, value in cols.items():
        if value is not None:
            table[:, COLUMNS.index(name)] = torch.as_tensor(value, dtype=torch.float64).to("cpu").reshape(-1)
    return table


def uses_history(table: torch.Tensor) -> bool:
    """Whether any step uses D_{k−1} or D_{k−2} (a multistep table)."""
    return bool(table[:, B1:B2 + 1].any())
