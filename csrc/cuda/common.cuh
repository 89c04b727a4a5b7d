// Device helpers shared by the CUDA kernels: noise normals and the per-query posterior for small d.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/philox.h"
#include "kernels.cuh"

namespace fastdiff::cuda {

constexpr int kThreads = 128;   // queries per block in the small-d kernels
constexpr int kTile = 128;      // data points staged in shared memory per tile

// The four normals of counter (quad, step, sample): Box–Muller in float (sincospi avoids rounding 2π·u).
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t sample, uint32_t step, uint32_t quad, float n[4]) {
  const Philox4 w = noise_words(seed, sample, step, quad);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float radius = sqrtf(-2.0f * logf(philox_uniform(w.r[2 * p])));
    float s, c;
    sincospif(2.0f * philox_uniform(w.r[2 * p + 1]), &s, &c);
    n[2 * p] = radius * c;
    n[2 * p + 1] = radius * s;
  }
}
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t sample, uint32_t step, uint32_t quad, double n[4]) {
  const Philox4 w = noise_words(seed, sample, step, quad);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const double radius = sqrt(-2.0 * log(static_cast<double>(philox_uniform(w.r[2 * p]))));
    double s, c;
    sincospi(2.0 * static_cast<double>(philox_uniform(w.r[2 * p + 1])), &s, &c);
    n[2 * p] = radius * c;
    n[2 * p + 1] = radius * s;
  }
}

// x − αy as (x − c1·y) + c2·y (as the CPU and Triton kernels do): for α ≥ ½, c1 = 1 and c2 = 1 − α from
// double, so x − y is exact and only the small (1 − α)y term carries α's rounding; x − fl(α)·y would move a
// logit at σ = 1e-3, d = 784 by ~2e-3 (MATH.md §7 allows 1e-3).
template <typename T>
struct ScaledDiff {
  T c1, c2;
  __device__ explicit ScaledDiff(double alpha)
      : c1(alpha >= 0.5 ? T(1) : T(0)), c2(static_cast<T>(alpha >= 0.5 ? 1.0 - alpha : -alpha)) {}
  __device__ T operator()(T x, T y) const { return (x - c1 * y) + c2 * y; }
};

// x (registers, DMAX slots, d used) against the cloud; every thread of the block must call it (it stages
// data tiles in shared memory `tile` [kTile * d]); `active` threads own a query. Writes D (registers).
template <typename T, int DMAX>
__device__ void posterior_small_d(const Cloud<T>& c, const T (&x)[DMAX], double alpha, double sigma, bool active,
                                  T* tile, T* tile_lw, T (&D)[DMAX], T* L) {
  const int d = static_cast<int>(c.d);
  const double cd = alpha * alpha * c.bandwidth + sigma * sigma;
  const T inv2c = static_cast<T>(0.5 / cd);
  const ScaledDiff<T> diff_of(alpha);
  T acc[DMAX];
#pragma unroll
  for (int k = 0; k < DMAX; ++k) acc[k] = T(0);
  T m = -INFINITY, s = T(0);
  for (int64_t j0 = 0; j0 < c.N; j0 += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), c.N - j0));
    __syncthreads();
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) tile[e] = c.y[j0 * d + e];
    for (int e = threadIdx.x; e < n; e += blockDim.x) tile_lw[e] = c.log_w ? c.log_w[j0 + e] : T(0);
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {
      T dist = T(0);
#pragma unroll
      for (int k = 0; k < DMAX; ++k) {
        if (k < d) {
          const T diff = diff_of(x[k], tile[j * d + k]);
          dist += diff * diff;
        }
      }
      const T l = tile_lw[j] - dist * inv2c;
      if (l > m) {                 // new maximum: rescale what was accumulated
        const T r = exp(m - l);
        s = s * r + T(1);
#pragma unroll
        for (int k = 0; k < DMAX; ++k)
          if (k < d) acc[k] = acc[k] * r + tile[j * d + k];
        m = l;
      } else if (l > -INFINITY) {
        const T p = exp(l - m);
        s += p;
#pragma unroll
        for (int k = 0; k < DMAX; ++k)
          if (k < d) acc[k] += p * tile[j * d + k];
      }
    }
  }
  if (!active) return;
  const T shrink = c.bandwidth > 0 ? static_cast<T>(1.0 - alpha * alpha * c.bandwidth / cd) : T(1);
  const T pull = c.bandwidth > 0 ? static_cast<T>(alpha * c.bandwidth / cd) : T(0);
#pragma unroll
  for (int k = 0; k < DMAX; ++k)
    if (k < d) D[k] = acc[k] / s * shrink + pull * x[k];
  if (L) *L = m + log(s);
}

// x_out = A x + B D + C z for one row held in registers.
template <typename T, int DMAX>
__device__ __forceinline__ void update_small_d(T (&x)[DMAX], const T (&D)[DMAX], int d, double A, double B,
                                               double C, uint64_t seed, uint32_t step, uint64_t sample) {
  const T a = static_cast<T>(A), b = static_cast<T>(B), cc = static_cast<T>(C);
#pragma unroll
  for (int q = 0; q < (DMAX + 3) / 4; ++q) {
    if (4 * q >= d) break;
    T z[4] = {T(0), T(0), T(0), T(0)};
    if (C != 0.0) normals4(seed, sample, step, static_cast<uint32_t>(q), z);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (4 * q + e < d) x[4 * q + e] = a * x[4 * q + e] + b * D[4 * q + e] + cc * z[e];
  }
}

}  // namespace fastdiff::cuda
