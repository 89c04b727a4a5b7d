// The kernel step table (fastdiff/_table.py): float64 [K, kTableWidth], row-major, row k = step k:
//   x_{k+1} = A x_k + B0 D_k + B1 D_{k-1} + B2 D_{k-2} + C z_k,   D_k = posterior mean at (alpha_k, sigma_k).
// B1 and B2 are the multistep columns (0 for one-step methods): D_{k-1}, D_{k-2} are the D's of rows k-1, k-2.
// t is informational (callbacks, reports).
// Torch-free: included by the CPU and CUDA kernels and by the glue.
#pragma once
#include <cstdint>

namespace fastdiff {

enum TableColumn : int { kColT = 0, kColAlpha, kColSigma, kColA, kColB0, kColB1, kColB2, kColC, kTableWidth };

// How many past D's a [K, kTableWidth] table uses: 2 when some B2 is nonzero, else 1 when some B1 is, else 0.
// The kernels keep that many D's per row across steps (and none for one-step tables, which run as before).
inline int history_depth(const double* table, int64_t K) {
  int depth = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double* row = table + k * kTableWidth;
    if (row[kColB2] != 0.0) return 2;
    if (row[kColB1] != 0.0) depth = 1;
  }
  return depth;
}

// The first row that uses a D from before the table's first step (B1 != 0 at row 0, or B2 != 0 at row 0 or 1),
// or -1. There is no D_{-1} or D_{-2}: the glue refuses such a table rather than read unset history.
inline int64_t first_row_before_history(const double* table, int64_t K) {
  for (int64_t k = 0; k < K && k < 2; ++k) {
    const double* row = table + k * kTableWidth;
    if ((k == 0 && row[kColB1] != 0.0) || row[kColB2] != 0.0) return k;
  }
  return -1;
}

}  // namespace fastdiff
