// Device helpers shared by the CUDA kernels: noise normals, the shared numeric rule, the per-query posterior for
// small d.
#pragma once
#include <cfloat>
#include <cstdint>

#include "../common/far.h"
#include "../common/philox.h"
#include "kernels.cuh"

// Launches and shared memory are spelled through these macros so that csrc/emu/cuda_emu.h can run the kernels
// on the CPU in the tests (it defines them itself). FD_LAUNCH(grid, block, shmem, stream, kernel)(args...);
// FD_EXTERN_SHARED(T, name): the dynamic shared memory as T*; FD_SHARED(T, name, n): a static __shared__ T[n].
#ifndef FASTDIFF_CUDA_EMU
#define FD_LAUNCH(grid, block, shmem, stream, ...) __VA_ARGS__<<<grid, block, shmem, stream>>>
#define FD_EXTERN_SHARED(T, name)                           \
  extern __shared__ __align__(16) unsigned char fd_smem_[]; \
  T* const name = reinterpret_cast<T*>(fd_smem_)
#define FD_SHARED(T, name, n) __shared__ T name[n]
#endif

namespace fastdiff::cuda {

constexpr int kThreads = 128;   // queries per block in the small-d kernels
constexpr int kTile = 128;      // data points staged in shared memory per tile

// The four normals of counter (quad, step, sample), as fastdiff/noise.py computes them: Box–Muller in double
// from the exact float uniforms, angle fl64(2π·u) (not sincospi(2u), which differs from the reference by up to
// ~700 ulps near the zeros of cos and sin), then rounded to T. So float32 agrees with the reference bit for bit
// up to the last-ulp differences of the double log/sincos, and float64 to a few ulps.
template <typename T>
__device__ __forceinline__ void normals4(uint64_t seed, uint64_t sample, uint32_t step, uint32_t quad, T n[4]) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;   // fl64(2π), as Python's 2 * math.pi
  const Philox4 w = noise_words(seed, sample, step, quad);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const double radius = sqrt(-2.0 * log(static_cast<double>(philox_uniform(w.r[2 * p]))));
    double s, c;
    sincos(kTwoPi * static_cast<double>(philox_uniform(w.r[2 * p + 1])), &s, &c);
    n[2 * p] = static_cast<T>(radius * c);
    n[2 * p + 1] = static_cast<T>(radius * s);
  }
}

// The shared numeric rule (points 1, 2), as the torch reference applies it: 1/(2c) clamped to
// [smallest subnormal, largest finite] of the working type W (so distance 0 never meets inf, nor an overflowed
// distance 0), and a point with finite log-weight keeps a logit >= −max_finite(W) even when its squared distance
// overflowed (max is fmax: a NaN operand loses); log-weight −inf stays excluded. D and L stay finite.
template <typename W>
__device__ __forceinline__ W max_finite();
template <>
__device__ __forceinline__ float max_finite<float>() { return FLT_MAX; }
template <>
__device__ __forceinline__ double max_finite<double>() { return DBL_MAX; }

template <typename W>
__device__ __forceinline__ W clamped_inv2c(double c) {
  const double lo = sizeof(W) == sizeof(float) ? 1.40129846e-45 : 4.9406564584124654e-324;
  return static_cast<W>(fmin(fmax(0.5 / c, lo), static_cast<double>(max_finite<W>())));
}

template <typename W>
__device__ __forceinline__ W clamped_logit(W log_w, W dist, W inv2c) {
  return log_w > W(-INFINITY) ? max(log_w - dist * inv2c, -max_finite<W>()) : W(-INFINITY);
}

// Opt in to the most dynamic shared memory a kernel instantiation can ask for: the driver's default limit is
// 48 KiB minus the kernel's static shared memory, and a launch above it fails. The value is fixed per
// instantiation (not the launch's own size), so launches from several host threads never race on the attribute.
template <typename Kernel>
cudaError_t opt_in_shared(Kernel kernel, size_t max_dynamic_bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_dynamic_bytes));
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

// 0.5/c in double, clamped to T's range as clamped_inv2c<T> (the far rows keep it in double).
template <typename T>
__device__ __forceinline__ double clamped_inv2c_double(double c) {
  const double lo = sizeof(T) == sizeof(float) ? 1.40129846e-45 : 4.9406564584124654e-324;
  return fmin(fmax(0.5 / c, lo), static_cast<double>(max_finite<T>()));
}

// The block copies data points [j0, j0 + n) and their log-weights into shared memory. Every thread of the block
// calls it: the first barrier keeps the previous tile until all threads are done with it, the second makes the
// new one visible.
template <typename T>
__device__ __forceinline__ void stage_tile(const Cloud<T>& c, int64_t j0, int n, int d, T* tile, T* tile_lw) {
  __syncthreads();
  for (int e = threadIdx.x; e < n * d; e += blockDim.x) tile[e] = c.y[j0 * d + e];
  for (int e = threadIdx.x; e < n; e += blockDim.x) tile_lw[e] = c.log_w ? c.log_w[j0 + e] : T(0);
  __syncthreads();
}

// posterior_small_d for the far rows of a block (csrc/common/far.h: why, which rows, the bound): logits in
// double-double, one online maximum, sums in double (compensated for T = double, with D as the compensation;
// float needs none: N·2⁻⁵³ ≪ 2⁻²⁴). Every thread of the block calls it (tiles staged together); `mine` threads
// own a far query and write D, L.
template <typename T, int DMAX>
__device__ void posterior_small_d_far(const Cloud<T>& c, const T (&x)[DMAX], double alpha, double sigma, bool mine,
                                      T* tile, T* tile_lw, T (&D)[DMAX], T* L) {
  const int d = static_cast<int>(c.d);
  const double cd = alpha * alpha * c.bandwidth + sigma * sigma;
  const double inv2c = clamped_inv2c_double<T>(cd), floor = static_cast<double>(max_finite<T>());
  const far::Diff diff_of(alpha);
  constexpr bool kComp = sizeof(T) == sizeof(double);
  double acc[DMAX];
#pragma unroll
  for (int k = 0; k < DMAX; ++k) {
    acc[k] = 0.0;
    if constexpr (kComp) D[k] = T(0);
  }
  far::DD m{-INFINITY, 0.0};
  double s = 0.0, sc = 0.0;
  for (int64_t j0 = 0; j0 < c.N; j0 += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), c.N - j0));
    stage_tile(c, j0, n, d, tile, tile_lw);
    if (!mine) continue;
    for (int j = 0; j < n; ++j) {
      far::DD dist{0.0, 0.0};
#pragma unroll
      for (int k = 0; k < DMAX; ++k)
        if (k < d) far::sq_add(dist, diff_of(static_cast<double>(x[k]), static_cast<double>(tile[j * d + k])));
      const far::DD l = far::far_logit_of(static_cast<double>(tile_lw[j]), dist, inv2c, floor);
      if (!(l.hi > -INFINITY)) continue;
      if (far::dd_greater(l, m)) {      // a new maximum: rescale what was summed
        const double r = m.hi > -INFINITY ? far::dd_exp_diff(m, l) : 0.0;
        s *= r;
        sc *= r;
#pragma unroll
        for (int k = 0; k < DMAX; ++k) {
          acc[k] *= r;
          if constexpr (kComp) D[k] *= r;
        }
        m = l;
      }
      const double e = far::dd_exp_diff(l, m);
      far::comp_add(s, sc, e);
#pragma unroll
      for (int k = 0; k < DMAX; ++k) {
        if (k >= d) continue;
        const double v = e * static_cast<double>(tile[j * d + k]);
        if constexpr (kComp) far::comp_add(acc[k], D[k], v);
        else acc[k] += v;
      }
    }
  }
  if (!mine) return;
  const double shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cd : 1.0;
  const double pull = c.bandwidth > 0 ? alpha * c.bandwidth / cd : 0.0;
  const double sum = s + sc;
#pragma unroll
  for (int k = 0; k < DMAX; ++k) {
    if (k >= d) continue;
    const double a = kComp ? acc[k] + static_cast<double>(D[k]) : acc[k];
    D[k] = static_cast<T>(a / sum * shrink + pull * static_cast<double>(x[k]));
  }
  if (L) *L = static_cast<T>(m.hi + (m.lo + log(sum)));
}

// x (registers, DMAX slots, d used) against the cloud; every thread of the block must call it (it stages
// data tiles in shared memory `tile` [kTile * d]); `active` threads own a query. Writes D (registers).
// Within a tile the online log-sum-exp runs in T; each tile's sums are merged into double (shared numeric rule
// 4), so no float sum grows past a tile's worth of terms: L keeps MATH.md §7 for any N (one point at a time in
// float, 2^15 points of relative weight 2^-24 vanish).
template <typename T, int DMAX>
__device__ void posterior_small_d(const Cloud<T>& c, const T (&x)[DMAX], double alpha, double sigma, bool active,
                                  T* tile, T* tile_lw, T (&D)[DMAX], T* L) {
  const int d = static_cast<int>(c.d);
  const double cd = alpha * alpha * c.bandwidth + sigma * sigma;
  const T inv2c = clamped_inv2c<T>(cd);
  const ScaledDiff<T> diff_of(alpha);
  double acc[DMAX];
#pragma unroll
  for (int k = 0; k < DMAX; ++k) acc[k] = 0.0;
  double m = -INFINITY, s = 0.0;
  double lw_top = 0.0;             // the log-weight of the point with the largest logit (the far-row test)
  for (int64_t j0 = 0; j0 < c.N; j0 += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), c.N - j0));
    stage_tile(c, j0, n, d, tile, tile_lw);
    if (!active) continue;
    T tacc[DMAX];
#pragma unroll
    for (int k = 0; k < DMAX; ++k) tacc[k] = T(0);
    T tm = -INFINITY, ts = T(0), tlw = T(0);
    for (int j = 0; j < n; ++j) {
      T dist = T(0);
#pragma unroll
      for (int k = 0; k < DMAX; ++k) {
        if (k < d) {
          const T diff = diff_of(x[k], tile[j * d + k]);
          dist += diff * diff;
        }
      }
      const T l = clamped_logit(tile_lw[j], dist, inv2c);
      if (l > tm) {                // new maximum of the tile: rescale what the tile accumulated
        const T r = exp(tm - l);
        ts = ts * r + T(1);
#pragma unroll
        for (int k = 0; k < DMAX; ++k)
          if (k < d) tacc[k] = tacc[k] * r + tile[j * d + k];
        tm = l;
        tlw = tile_lw[j];
      } else if (l > -INFINITY) {
        const T p = exp(l - tm);
        ts += p;
#pragma unroll
        for (int k = 0; k < DMAX; ++k)
          if (k < d) tacc[k] += p * tile[j * d + k];
      }
    }
    if (!(tm > -INFINITY)) continue;   // a tile of zero-weight points
    if (static_cast<double>(tm) > m) lw_top = static_cast<double>(tlw);
    const double m_new = fmax(m, static_cast<double>(tm));
    const double r_old = exp(m - m_new), r_tile = exp(static_cast<double>(tm) - m_new);
    s = s * r_old + static_cast<double>(ts) * r_tile;
#pragma unroll
    for (int k = 0; k < DMAX; ++k)
      if (k < d) acc[k] = acc[k] * r_old + static_cast<double>(tacc[k]) * r_tile;
    m = m_new;
  }
  // Far rows (every point's distance part > d + 16, csrc/common/far.h) lost ≈ u·p of their logit differences
  // above: if the block has any, it runs them again with double-double logits (the others wait at its barriers).
  const bool far_row = active && far::is_far(m, lw_top, d);
  if (__syncthreads_or(far_row)) {
    posterior_small_d_far<T, DMAX>(c, x, alpha, sigma, far_row, tile, tile_lw, D, L);
    if (far_row) return;
  }
  if (!active) return;
  const double shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cd : 1.0;
  const double pull = c.bandwidth > 0 ? alpha * c.bandwidth / cd : 0.0;
#pragma unroll
  for (int k = 0; k < DMAX; ++k)
    if (k < d) D[k] = static_cast<T>(acc[k] / s * shrink + pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(m + log(s));
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
