// The kernel step table (fastdiff/_table.py): float64 [K, kTableWidth], row-major, row k = step k:
//   x_{k+1} = A x_k + B0 D_k + B1 D_{k-1} + B2 D_{k-2} + C z_k,   D_k = posterior mean at (alpha_k, sigma_k).
// B1 and B2 are the multistep columns (0 for one-step methods). t is informational (callbacks, reports).
// Torch-free: included by the CPU and CUDA kernels and by the glue.
#pragma once

namespace fastdiff {

enum TableColumn : int { kColT = 0, kColAlpha, kColSigma, kColA, kColB0, kColB1, kColB2, kColC, kTableWidth };

}  // namespace fastdiff
