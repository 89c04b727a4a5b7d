// The affine sampler update of one row, out = A x + B D + C z, evaluated in double and rounded once
// (shared by the affine step and the fused point-cloud kernels).
#pragma once
#include <cstdint>

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

}  // namespace fastdiff::cpu
