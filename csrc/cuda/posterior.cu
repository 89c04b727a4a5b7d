// CUDA point-cloud posterior (MATH.md §5). Small d (<= 64): one thread per query, data tiles in shared
// memory, online log-sum-exp in registers (per-tile sums merged in double). Large d: one block per query; warps
// score a tile of points by direct differences (exact at small σ), the block keeps the online log-sum-exp and
// threads own slices of D, all in double (see LargeAcc).
#include "common.cuh"

namespace fastdiff::cuda {
namespace {

template <typename T, int DMAX>
__global__ void posterior_small_kernel(Cloud<T> c, const T* __restrict__ x, int64_t M, const double* alpha,
                                       const double* sigma, bool per_row, T* __restrict__ D, T* __restrict__ L) {
  FD_EXTERN_SHARED(T, tile);
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
// The most slices of a query one thread of the large kernel owns: kCudaMaxD (csrc/common/limits.h) is this limit.
constexpr int kLargeMaxSlices = static_cast<int>(kCudaMaxD / kLargeThreads);
static_assert(kLargeMaxSlices * kLargeThreads == kCudaMaxD, "kCudaMaxD must be whole slices of the large kernel");

// The large kernel works in double whatever T is: it is bound by reading the data, so double arithmetic costs
// little, and far queries keep their accuracy (x = 1e4·1, d = 300, σ = 300: float32 logits near −1.7e5 are
// rounded to 0.016, which moves the weights by ~1%; exact differences and logits in double do not).
using LargeAcc = double;

// A far row of the large kernel (csrc/common/far.h: why, which rows, the bound), run by the whole block: warps
// score points with double-double distances (lanes' partial sums merged by TwoSum), the block keeps one online
// maximum in double-double; threads own slices of D as in the kernel below. T = double compensates its sums with
// D itself (each element owned by one thread); float needs none (N·2⁻⁵³ ≪ 2⁻²⁴).
template <typename T, int KPT>
__device__ void posterior_large_far(const Cloud<T>& c, const LargeAcc* xs, int64_t i, double al, double sg,
                                    LargeAcc* logits, LargeAcc* logits_lo, T* __restrict__ D, T* __restrict__ L) {
  const int64_t d = c.d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr bool kComp = sizeof(T) == sizeof(double);
  const double cd = al * al * c.bandwidth + sg * sg;
  const double inv2c = clamped_inv2c_double<T>(cd), floor = static_cast<double>(max_finite<T>());
  const far::Diff diff_of(al);
  double acc[KPT];
#pragma unroll
  for (int e = 0; e < KPT; ++e) {
    acc[e] = 0.0;
    const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
    if (kComp && k < d) D[i * d + k] = T(0);
  }
  far::DD m{-INFINITY, 0.0};
  double s = 0.0, sc = 0.0;
  for (int64_t j0 = 0; j0 < c.N; j0 += kLargeTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kLargeTile), c.N - j0));
    for (int j = warp; j < kLargeTile; j += kLargeThreads / 32) {
      far::DD dist{0.0, 0.0};
      if (j < n) {
        const T* y = c.y + (j0 + j) * d;
        for (int64_t k = lane; k < d; k += 32) far::sq_add(dist, diff_of(xs[k], static_cast<double>(y[k])));
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const double hi = __shfl_xor_sync(0xffffffffu, dist.hi, off), lo = __shfl_xor_sync(0xffffffffu, dist.lo, off);
        const far::DD t = far::two_sum(dist.hi, hi);
        dist = {t.hi, (dist.lo + lo) + t.lo};
      }
      if (lane == 0) {
        const double lw = c.log_w ? static_cast<double>(c.log_w[j0 + j < c.N ? j0 + j : 0]) : 0.0;
        const far::DD l = j < n ? far::far_logit_of(lw, dist, inv2c, floor) : far::DD{-INFINITY, 0.0};
        logits[j] = l.hi;
        logits_lo[j] = l.lo;
      }
    }
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      const far::DD l{logits[j], logits_lo[j]};
      if (!(l.hi > -INFINITY)) continue;
      if (far::dd_greater(l, m)) {     // a new maximum: rescale what was summed
        const double r = m.hi > -INFINITY ? far::dd_exp_diff(m, l) : 0.0;
        s *= r;
        sc *= r;
#pragma unroll
        for (int e = 0; e < KPT; ++e) {
          acc[e] *= r;
          const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
          if (kComp && k < d) D[i * d + k] *= r;
        }
        m = l;
      }
      const double p = far::dd_exp_diff(l, m);
      far::comp_add(s, sc, p);
      const T* y = c.y + (j0 + j) * d;
#pragma unroll
      for (int e = 0; e < KPT; ++e) {
        const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
        if (k >= d) continue;
        const double v = p * static_cast<double>(y[k]);
        if constexpr (kComp) {
          double comp = static_cast<double>(D[i * d + k]);
          far::comp_add(acc[e], comp, v);
          D[i * d + k] = static_cast<T>(comp);
        } else {
          acc[e] += v;
        }
      }
    }
    __syncthreads();
  }
  const double shrink = c.bandwidth > 0 ? 1.0 - al * al * c.bandwidth / cd : 1.0;
  const double pull = c.bandwidth > 0 ? al * c.bandwidth / cd : 0.0;
  const double sum = s + sc;
#pragma unroll
  for (int e = 0; e < KPT; ++e) {
    const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
    if (k >= d) continue;
    const double a = kComp ? acc[e] + static_cast<double>(D[i * d + k]) : acc[e];
    D[i * d + k] = static_cast<T>(a / sum * shrink + pull * xs[k]);
  }
  if (threadIdx.x == 0) L[i] = static_cast<T>(m.hi + (m.lo + log(sum)));
}

template <typename T, int KPT>
__global__ void posterior_large_kernel(Cloud<T> c, const T* __restrict__ x, int64_t M, const double* alpha,
                                       const double* sigma, bool per_row, T* __restrict__ D, T* __restrict__ L) {
  FD_SHARED(LargeAcc, logits, kLargeTile);
  FD_SHARED(LargeAcc, logits_lo, kLargeTile);   // far rows: the low parts of double-double logits
  FD_EXTERN_SHARED(LargeAcc, xs);           // [d]
  const int64_t i = blockIdx.x;
  const int64_t d = c.d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) xs[k] = static_cast<LargeAcc>(x[i * d + k]);
  const int64_t r = per_row ? i : 0;
  const double al = alpha[r], sg = sigma[r];
  const double cd = al * al * c.bandwidth + sg * sg;
  const LargeAcc inv2c = clamped_inv2c<LargeAcc>(cd);
  const ScaledDiff<LargeAcc> diff_of(al);
  LargeAcc acc[KPT];
#pragma unroll
  for (int e = 0; e < KPT; ++e) acc[e] = LargeAcc(0);
  LargeAcc m = -INFINITY, s = LargeAcc(0);
  LargeAcc lw_max = c.log_w ? -INFINITY : 0.0;   // per warp's lane 0 until the end (the far-row test)
  __syncthreads();
  for (int64_t j0 = 0; j0 < c.N; j0 += kLargeTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kLargeTile), c.N - j0));
    for (int j = warp; j < kLargeTile; j += kLargeThreads / 32) {
      LargeAcc dist = LargeAcc(0);
      if (j < n) {
        const T* y = c.y + (j0 + j) * d;
        for (int64_t k = lane; k < d; k += 32) {
          const LargeAcc diff = diff_of(xs[k], static_cast<LargeAcc>(y[k]));
          dist += diff * diff;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dist += __shfl_xor_sync(0xffffffffu, dist, off);
      if (lane == 0) {
        const LargeAcc lw = c.log_w ? static_cast<LargeAcc>(c.log_w[j0 + j < c.N ? j0 + j : 0]) : LargeAcc(0);
        logits[j] = j < n ? clamped_logit(lw, dist, inv2c) : LargeAcc(-INFINITY);
        if (j < n) lw_max = max(lw_max, lw);
      }
    }
    __syncthreads();
    LargeAcc tmax = -INFINITY;
    for (int j = 0; j < n; ++j) tmax = max(tmax, logits[j]);
    if (tmax > -INFINITY) {
      const LargeAcc m_new = max(m, tmax);
      const LargeAcc rescale = exp(m - m_new);
      s *= rescale;
#pragma unroll
      for (int e = 0; e < KPT; ++e) acc[e] *= rescale;
      for (int j = 0; j < n; ++j) {
        const LargeAcc p = exp(logits[j] - m_new);
        s += p;
        const T* y = c.y + (j0 + j) * d;
#pragma unroll
        for (int e = 0; e < KPT; ++e) {
          const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
          if (k < d) acc[e] += p * static_cast<LargeAcc>(y[k]);
        }
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (c.log_w) {                      // the largest log-weight: lane 0 of each warp saw a share of the points
    if (lane == 0) logits[warp] = lw_max;
    __syncthreads();
    for (int w = 0; w < kLargeThreads / 32; ++w) lw_max = max(lw_max, logits[w]);
    __syncthreads();
  }
  // m is the same in every thread: a far row (csrc/common/far.h) runs again with double-double logits.
  if (far::is_far(m, lw_max, d))
    return posterior_large_far<T, KPT>(c, xs, i, al, sg, logits, logits_lo, D, L);
  const LargeAcc shrink = c.bandwidth > 0 ? 1.0 - al * al * c.bandwidth / cd : 1.0;
  const LargeAcc pull = c.bandwidth > 0 ? al * c.bandwidth / cd : 0.0;
#pragma unroll
  for (int e = 0; e < KPT; ++e) {
    const int64_t k = threadIdx.x + static_cast<int64_t>(e) * kLargeThreads;
    if (k < d) D[i * d + k] = static_cast<T>(acc[e] / s * shrink + pull * xs[k]);
  }
  // Saturated to T's range: a float32 L below −max_float (overflowed logits, worked in double) stays finite.
  if (threadIdx.x == 0) L[i] = static_cast<T>(max(m + log(s), -static_cast<LargeAcc>(max_finite<T>())));
}

template <typename T, int DMAX>
cudaError_t small(const Cloud<T>& c, const T* x, int64_t M, const double* a, const double* s, bool pr, T* D, T* L,
                  cudaStream_t st) {
  const size_t shmem = (kTile * c.d + kTile) * sizeof(T);
  const cudaError_t e = opt_in_shared(posterior_small_kernel<T, DMAX>, (kTile * DMAX + kTile) * sizeof(T));
  if (e != cudaSuccess) return e;
  const unsigned blocks = static_cast<unsigned>((M + kThreads - 1) / kThreads);
  FD_LAUNCH(blocks, kThreads, shmem, st, posterior_small_kernel<T, DMAX>)(c, x, M, a, s, pr, D, L);
  return cudaGetLastError();
}

template <typename T, int KPT>
cudaError_t large(const Cloud<T>& c, const T* x, int64_t M, const double* a, const double* s, bool pr, T* D, T* L,
                  cudaStream_t st) {
  const size_t shmem = c.d * sizeof(LargeAcc);
  const cudaError_t e = opt_in_shared(posterior_large_kernel<T, KPT>, KPT * kLargeThreads * sizeof(LargeAcc));
  if (e != cudaSuccess) return e;
  FD_LAUNCH(static_cast<unsigned>(M), kLargeThreads, shmem, st, posterior_large_kernel<T, KPT>)(c, x, M, a, s, pr, D,
                                                                                                  L);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma,
                             bool per_row, T* D, T* L, cudaStream_t stream) {
  if (c.d > kCudaMaxD) return cudaErrorInvalidValue;   // refused by the glue before launch (its message names d)
  if (M == 0) return cudaSuccess;
  if (c.d <= 4) return small<T, 4>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 16) return small<T, 16>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 64) return small<T, 64>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 4 * kLargeThreads) return large<T, 4>(c, x, M, alpha, sigma, per_row, D, L, stream);
  if (c.d <= 16 * kLargeThreads) return large<T, 16>(c, x, M, alpha, sigma, per_row, D, L, stream);
  return large<T, kLargeMaxSlices>(c, x, M, alpha, sigma, per_row, D, L, stream);
}

template cudaError_t launch_posterior<float>(const Cloud<float>&, const float*, int64_t, const double*, const double*,
                                             bool, float*, float*, cudaStream_t);
template cudaError_t launch_posterior<double>(const Cloud<double>&, const double*, int64_t, const double*,
                                              const double*, bool, double*, double*, cudaStream_t);

}  // namespace fastdiff::cuda
