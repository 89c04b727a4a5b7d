// The kernel step table (fastdiff/_table.py): float64 [K, kTableWidth], row-major, row k = step k:
//   x^      = P x_k + Cchurn z_churn                                   (churn; P = 1, Cchurn = 0 without)
//   D_k     = posterior mean at x^ with (alpha, sigma)
//   u       = Ux x^ + UD D_k + Uz z_stage,  D_u = posterior mean at u with (alphaU, sigmaU)   (when BU != 0)
//   x_{k+1} = A x^ + B0 D_k + B1 D_{k-1} + B2 D_{k-2} + BU D_u + C w,  w = rho z_stage + sqrt(1 - rho^2) z_k
// B1 and B2 are the multistep columns (0 for one-step methods): D_{k-1}, D_{k-2} are the D's of rows k-1, k-2.
// z_stage and z_churn are the noise contract's draws at steps kStageStepBase + k and kChurnStepBase + k.
// A row with P = 1 and Cchurn = BU = rho = 0 is a one-step row (row_is_one_step). t is informational.
// Torch-free: included by the CPU and CUDA kernels and by the glue.
#pragma once
#include <cstdint>

// The row predicates run in the CUDA kernels too (the whole-trajectory kernel branches on each device row).
#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__
#else
#define FD_HOST_DEVICE
#endif

namespace fastdiff {

enum TableColumn : int {
  kColT = 0, kColAlpha, kColSigma, kColA, kColB0, kColB1, kColB2, kColC,
  kColP, kColCchurn, kColAlphaU, kColSigmaU, kColUx, kColUD, kColUz, kColBU, kColRho, kTableWidth
};

// The noise steps of a row's stage and churn draws (fastdiff/methods.py STAGE_STEP_BASE, CHURN_STEP_BASE).
inline constexpr uint32_t kStageStepBase = 1u << 31;
inline constexpr uint32_t kChurnStepBase = (1u << 31) + (1u << 30);

FD_HOST_DEVICE inline bool row_churns(const double* row) { return row[kColP] != 1.0 || row[kColCchurn] != 0.0; }
FD_HOST_DEVICE inline bool row_is_staged(const double* row) { return row[kColBU] != 0.0; }
FD_HOST_DEVICE inline bool row_is_one_step(const double* row) {
  return !row_churns(row) && !row_is_staged(row) && row[kColRho] == 0.0;
}

// Whether any row of a [K, kTableWidth] table churns or has a stage (the kernels then compile their stage code).
inline bool table_has_stages(const double* table, int64_t K) {
  for (int64_t k = 0; k < K; ++k)
    if (!row_is_one_step(table + k * kTableWidth)) return true;
  return false;
}

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
