// The kernel step table (fastdiff/_table.py): float64 [K, kTableWidth], row-major, row k = step k:
//   x_{k+1} = A x_k + B0 D_k + B1 D_{k-1} + B2 D_{k-2} + C z_k,   D_k = posterior mean at (alpha_k, sigma_k).
// B1 and B2 are the multistep columns (0 for one-step methods). t is informational (callbacks, reports).
// Torch-free: included by the CPU and CUDA kernels and by the glue.
#pragma once
#include <cstdint>

namespace fastdiff {

enum TableColumn : int { kColT = 0, kColAlpha, kColSigma, kColA, kColB0, kColB1, kColB2, kColC, kTableWidth };

// The first row of a [K, kTableWidth] table whose multistep columns B1/B2 are nonzero (NaN counts), or -1.
// Kernels that do not implement them refuse such a table through this (never ignore the columns).
inline int64_t first_multistep_row(const double* table, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const double* row = table + k * kTableWidth;
    if (!(row[kColB1] == 0.0 && row[kColB2] == 0.0)) return k;
  }
  return -1;
}

}  // namespace fastdiff
