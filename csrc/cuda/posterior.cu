// CUDA point-cloud posterior (MATH.md §5). Small d (<= 64): one thread per query, data tiles in shared
// memory, online log-sum-exp in registers. Large d: one block per query; warps score a tile of points by
// direct differences (exact at small σ), the block keeps the online log-sum-exp and threads own slices of D.
#include "common.cuh"

namespace fastdiff::cuda {
namespace {

template <typename T, int DMAX>
__global__ void posterior_small_kernel(Cloud<T> c, const T* __restrict__ x, int64_t M, const double* alpha,
                                       const double* sigma, bool per_row, T* __restrict__ D, T* __restrict__ L) {
  extern __shared__ unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  T* tile_lw = tile + kTile * c.d;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < M;
  const int d = static_cast<int>(c.d);
  T xr[DMAX], Dr[DMAX];
#pragma unroll
  for (int k = 0; k < DMAX; ++k) xr[k] = (active && k < d) ? x[i * d + k] : T(0);
  const int64_t r = per_row && active ? i : 0;
  T Lr;
  posterior_small_d<T, DMAX>(c, xr, alpha[r], sigma[r], active, tile, tile_lw, Dr, &Lr);
  if (!active) return;
#pragma unroll
  for (int k = 0; k < DMAX; ++k)
    if (k < d) D[i * d + k] = Dr[k];
  L[i] = Lr;
}

constexpr int kLargeThreads = 256;
constexpr int kLargeTile = 32;     // points scored per round (8 warps x 4 points)

template <typename T, int KPT>
__global__ void posterior_large_kernel(Cloud<T> c, const T* __restrict__ x, int64_t M, const double* alpha,
                                       const double* sigma, bool per_row, T* __restrict__ D, T* __restrict__ L) {
  extern __shared__ unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);           // [d]
  __shared__ T logits[kLargeTile];
  const int64_t i = blockIdx.x;
  const int64_t d = c.d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) xs[k] = x[i * d + k];
  const int64_t r = per_row ? i : 0;
  const double al = alpha[r], sg = sigma[r];
  const double cd = al * al * c.bandwidth + sg * sg;
  const T inv2c = static_cast<T>(0.5 / cd);
  const ScaledDiff<T> diff_of(al);
  T acc[KPT];
#pragma unroll
  for (int e = 0; e < KPT; ++e) acc[e] = T(0);
  T m = -INFINITY, s = T(0);
  __syncthreads();
  for (int64_t j0 = 0; j0 < c.N; j0 += kLargeTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kLargeTile), c.N - j0));
    for (int j = warp; j < kLargeTile; j += kLargeThreads / 32) {
      T dist = T(0);
      if (j < n) {
        const T* y = c.y + (j0 + j) * d;
        for (int64_t k = lane; k < d; k += 32) {
          const T diff = diff_of(xs[k], y[k]);
          dist += diff * diff;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dist += __shfl_xor_sync(0xffffffffu, dist, off);
      if (lane == 0) logits[j] = j < n ? (c.log_w ? c.log_w[j0 + j] : T(0)) - dist * inv2c : T(-INFINITY);
    }
    __syncthreads();
    T tmax = -INFINITY;
    for (int j = 0; j < n; ++j) tmax = max(tmax, logits[j]);
    if (tmax > -INFINITY) {
      const T m_new = max(m, tmax);
      const T rescale = exp(m - m_new);
      s *= rescale;
#pragma unroll
      for (int e = 0; e < KPT; ++e) acc[e] *= rescale;
      for (int j = 0; j < n; ++j) {
        const T p = exp(logits[j] - m_new);
        s += p;
        const T* y = c.y + (j0 + j) * d;
#pragma unroll
        for (int e = 0; e < KPT; ++e) {
          const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
          if (k < d) acc[e] += p * y[k];
        }
      }
      m = m_new;
    }
    __syncthreads();
  }
  const T shrink = c.bandwidth > 0 ? static_cast<T>(1.0 - al * al * c.bandwidth / cd) : T(1);
  const T pull = c.bandwidth > 0 ? static_cast<T>(al * c.bandwidth / cd) : T(0);
#pragma unroll
  for (int e = 0; e < KPT; ++e) {
    const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
    if (k < d) D[i * d + k] = acc[e] / s * shrink + pull * xs[k];
  }
  if (threadIdx.x == 0) L[i] = m + log(s);
}

template <typename T, int DMAX>
cudaError_t small(const Cloud<T>& c, const T* x, int64_t M, const double* a, const double* s, bool pr, T* D, T* L,
                  cudaStream_t st) {
  const size_t shmem = (kTile * c.d + kTile) * sizeof(T);
  const unsigned blocks = static_cast<unsigned>((M + kThreads - 1) / kThreads);
  posterior_small_kernel<T, DMAX><<<blocks, kThreads, shmem, st>>>(c, x, M, a, s, pr, D, L);
  return cudaGetLastError();
}

template <typename T, int KPT>
cudaError_t large(const Cloud<T>& c, const T* x, int64_t M, const double* a, const double* s, bool pr, T* D, T* L,
                  cudaStream_t st) {
  const size_t shmem = c.d * sizeof(T);
  if (shmem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(posterior_large_kernel<T, KPT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shmem));
    if (e != cudaSuccess) return e;
  }
  posterior_large_kernel<T, KPT><<<static_cast<unsigned>(M), kLargeThreads, shmem, st>>>(c, x, M, a, s, pr, D, L);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma,
                             bool per_row, T* D, T* L, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (c.d <= 4) return small<T, 4>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 16) return small<T, 16>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 64) return small<T, 64>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 4 * kLargeThreads) return large<T, 4>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 16 * kLargeThreads) return large<T, 16>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 48 * kLargeThreads) return large<T, 48>(c, x, M, alpha, sigma, per_row, D, L, stream);
  return cudaErrorInvalidValue;   // d > 12288: refused by the glue before launch
}

template cudaError_t launch_posterior<float>(const Cloud<float>&, const float*, int64_t, const double*, const double*,
                                             bool, float*, float*, cudaStream_t);
template cudaError_t launch_posterior<double>(const Cloud<double>&, const double*, int64_t, const double*,
                                              const double*, bool, double*, double*, cudaStream_t);

}  // namespace fastdiff::cuda
