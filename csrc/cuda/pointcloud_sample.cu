// Whole point-cloud trajectories on CUDA: every row of a step table (csrc/common/table.h), x updated in place.
#include "../common/table.h"
#include "common.cuh"
#include "steps.cuh"

namespace fastdiff::cuda {

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
  if (c.d <= 64) {   // one launch: the queries stay in registers across all K steps
    const StepCoeffs co{table, nullptr, nullptr, 0.0, 0.0, 0.0};
    return launch_steps<T>(c, x, x, M, 0, K, co, seed, sample_offset, traj, stream);
  }
  // Large d: a launch pair per step, all queued on the stream (no host synchronisation); the posterior reads
  // alpha and sigma from the device table, the step's A, B0, C are passed by value from the host rows.
  for (int64_t k = 0; k < K; ++k) {
    const double* row = table + k * kTableWidth;
    const double* row_host = table_host + k * kTableWidth;
    cudaError_t e = launch_posterior<T>(c, x, M, row + kColAlpha, row + kColSigma, false, scratch, scratch + M * c.d,
                                        stream);
    if (e == cudaSuccess)
      e = launch_affine_step<T>(x, scratch, x, M, c.d, row_host[kColA], row_host[kColB0], row_host[kColC], seed,
                                static_cast<uint32_t>(k), sample_offset, stream);
    if (e == cudaSuccess && traj)
      e = cudaMemcpyAsync(traj + (k + 1) * M * c.d, x, state_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return e;
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
