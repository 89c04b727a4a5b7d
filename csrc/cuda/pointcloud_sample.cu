// Whole point-cloud trajectories on CUDA: every row of a step table (csrc/common/table.h), x updated in place.
#include <utility>

#include "../common/table.h"
#include "common.cuh"
#include "steps.cuh"

namespace fastdiff::cuda {
namespace {

// x += B1 D_{k−1}, then x += B2 D_{k−2}, in T as the affine step (the large-d path's multistep terms, after the
// step's affine update; a zero coefficient reads nothing: the first rows' history is unset).
template <typename T>
__global__ void add_history_kernel(T* x, const T* H1, const T* H2, int64_t n, T b1, T b2, bool use1, bool use2) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n) return;
  T v = x[g];
  if (use1) v = v + b1 * H1[g];
  if (use2) v = v + b2 * H2[g];
  x[g] = v;
}

template <typename T>
cudaError_t launch_add_history(T* x, const T* H1, const T* H2, int64_t n, double B1, double B2, cudaStream_t st) {
  if (B1 == 0.0 && B2 == 0.0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  FD_LAUNCH(blocks, threads, 0, st, add_history_kernel<T>)(x, H1, H2, n, static_cast<T>(B1), static_cast<T>(B2),
                                                           B1 != 0.0, B2 != 0.0);
  return cudaGetLastError();
}

// d <= 64 with history: one launch whose queries keep x and the last `hist` D's in registers (steps.cuh).
template <typename T, int DMAX>
cudaError_t launch_history_small(const Cloud<T>& c, T* x, int64_t M, int64_t K, const StepCoeffs& co, uint64_t seed,
                                 uint64_t off, T* traj, int hist, cudaStream_t st) {
  if (hist == 1) return launch_steps_small<T, DMAX, 1>(c, x, x, M, 0, K, co, seed, off, traj, st);
  return launch_steps_small<T, DMAX, 2>(c, x, x, M, 0, K, co, seed, off, traj, st);
}

template <typename T>
cudaError_t launch_small(const Cloud<T>& c, T* x, int64_t M, int64_t K, const StepCoeffs& co, uint64_t seed,
                         uint64_t off, T* traj, int hist, cudaStream_t st) {
  if (hist == 0) return launch_steps<T>(c, x, x, M, 0, K, co, seed, off, traj, st);   // one-step tables as before
  if (c.d <= 4) return launch_history_small<T, 4>(c, x, M, K, co, seed, off, traj, hist, st);
  if (c.d <= 16) return launch_history_small<T, 16>(c, x, M, K, co, seed, off, traj, hist, st);
  return launch_history_small<T, 64>(c, x, M, K, co, seed, off, traj, hist, st);
}

}  // namespace

template <typename T>
cudaError_t launch_pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* table,
                                     const double* table_host, uint64_t seed, uint64_t sample_offset, T* traj,
                                     T* scratch, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  const size_t state_bytes = M * c.d * sizeof(T);
  if (traj) {
    cudaError_t e = cudaMemcpyAsync(traj, x, state_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return e;
  }
  const int hist = history_depth(table_host, K);
  if (c.d <= 64) {   // one launch: the queries stay in registers across all K steps
    const StepCoeffs co{table, nullptr, nullptr, 0.0, 0.0, 0.0};
    return launch_small<T>(c, x, M, K, co, seed, sample_offset, traj, hist, stream);
  }
  // Large d: a launch pair per step (a third for the multistep terms), all queued on the stream (no host
  // synchronisation); the posterior reads alpha and sigma from the device table, the step's A, B0, C (B1, B2) are
  // passed by value from the host rows. scratch: D [M, d], L [M], then `hist` history buffers [M, d]; the three
  // D buffers rotate by pointer (D_k becomes D_{k−1}), so nothing is copied.
  const int64_t n = M * c.d;
  T* L = scratch + n;
  T* D = scratch;
  T* H1 = hist >= 1 ? scratch + n + M : nullptr;
  T* H2 = hist >= 2 ? scratch + 2 * n + M : nullptr;
  for (int64_t k = 0; k < K; ++k) {
    const double* row = table + k * kTableWidth;
    const double* row_host = table_host + k * kTableWidth;
    cudaError_t e = launch_posterior<T>(c, x, M, row + kColAlpha, row + kColSigma, false, D, L, stream);
    if (e == cudaSuccess)
      e = launch_affine_step<T>(x, D, x, M, c.d, row_host[kColA], row_host[kColB0], row_host[kColC], seed,
                                static_cast<uint32_t>(k), sample_offset, stream);
    if (e == cudaSuccess && hist)
      e = launch_add_history<T>(x, H1, H2, n, row_host[kColB1], row_host[kColB2], stream);
    if (e == cudaSuccess && traj)
      e = cudaMemcpyAsync(traj + (k + 1) * n, x, state_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return e;
    if (hist >= 2) std::swap(H2, H1);
    if (hist >= 1) std::swap(H1, D);
  }
  return cudaSuccess;
}

#define FD_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_pointcloud_sample<T>(const Cloud<T>&, T*, int64_t, int64_t, const double*,   \
                                                   const double*, uint64_t, uint64_t, T*, T*, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)
#undef FD_INSTANTIATE

}  // namespace fastdiff::cuda
