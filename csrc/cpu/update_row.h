// The affine sampler update of one row, out = A x + B D + C z, evaluated in double and rounded once
// (shared by the affine step and the fused point-cloud kernels).
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/table.h"
#include "noise_row.h"

namespace fastdiff::cpu {

// out[k] = A x[k] + B D[k] (+ C z[k] when z is given). out may alias x or D (same index only).
template <typename T>
inline void axpby_row(const T* x, const T* D, T* out, int64_t d, double A, double B, double C,
                      const double* __restrict z) {
  if (z == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(A * static_cast<double>(x[k]) + B * static_cast<double>(D[k]));
  } else {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k)
      out[k] = static_cast<T>(A * static_cast<double>(x[k]) + B * static_cast<double>(D[k]) + C * z[k]);
  }
}

// One row with its noise drawn by the libm path (z: d + 4 doubles of scratch); no noise when C == 0.
template <typename T>
inline void update_row(const T* x, const T* D, T* out, int64_t d, double A, double B, double C, uint64_t seed,
                       uint32_t step, uint64_t sample, double* z) {
  if (C != 0.0) normal_row(seed, sample, step, d, z);
  axpby_row(x, D, out, d, A, B, C, C != 0.0 ? z : nullptr);
}

// The rows of a churned or two-stage table row (csrc/common/table.h), each formed in double and rounded once.
// x^ = P x + Cchurn z_churn (z: d + 4 doubles of scratch, reused).
template <typename T>
inline void churn_row(const T* x, T* xh, int64_t d, const double* row, uint64_t seed, uint32_t step, uint64_t sample,
                      double* z) {
  const double P = row[kColP], Cc = row[kColCchurn];
  if (Cc == 0.0) {
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) xh[e] = static_cast<T>(P * static_cast<double>(x[e]));
    return;
  }
  normal_row(seed, sample, kChurnStepBase + step, d, z);
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) xh[e] = static_cast<T>(P * static_cast<double>(x[e]) + Cc * z[e]);
}

// The stage point u = Ux x^ + UD D + Uz z_stage (zs: the row's stage draw, or nullptr when Uz = 0).
template <typename T>
inline void stage_point(const T* xh, const T* D, T* u, int64_t d, const double* row, const double* zs) {
  const double a = row[kColUx], b = row[kColUD], c = row[kColUz];
#pragma omp simd
  for (int64_t e = 0; e < d; ++e)
    u[e] = static_cast<T>(a * static_cast<double>(xh[e]) + b * static_cast<double>(D[e]) + (zs ? c * zs[e] : 0.0));
}

// out = A x^ + B0 D + BU Du + C w, w = rho z_stage + sqrt(1 − rho²) z_step (z_step drawn here into z, d + 4
// doubles; zs the stage draw when rho != 0; Du nullptr when BU = 0). out may alias x^ (same index only).
template <typename T>
inline void update_row_staged(const T* xh, const T* D, const T* Du, T* out, int64_t d, const double* row,
                              uint64_t seed, uint32_t step, uint64_t sample, const double* zs, double* z) {
  const double A = row[kColA], B0 = row[kColB0], BU = Du ? row[kColBU] : 0.0, C = row[kColC], rho = row[kColRho];
  if (C != 0.0) {
    normal_row(seed, sample, step, d, z);
    const double keep = std::sqrt(1.0 - rho * rho);
    if (rho != 0.0) {
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) z[e] = rho * zs[e] + keep * z[e];
    }
  }
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) {
    double v = A * static_cast<double>(xh[e]) + B0 * static_cast<double>(D[e]);
    if (Du) v += BU * static_cast<double>(Du[e]);
    out[e] = static_cast<T>(C != 0.0 ? v + C * z[e] : v);
  }
}

}  // namespace fastdiff::cpu
