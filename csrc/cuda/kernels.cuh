// Torch-free CUDA kernels: raw pointers, a cudaStream_t, explicit instantiations. Glue in csrc/ops/.
#pragma once
#ifdef FASTDIFF_CUDA_EMU
#include "../emu/cuda_emu.h"   // the tests' CPU emulation of CUDA (csrc/emu/); never in the installed build
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "../common/limits.h"   // kCudaMaxD: the largest d of the point-cloud kernels (launchers refuse more)
#include "../common/table.h"

namespace fastdiff::cuda {

template <typename T>
struct Cloud {
  const T* y;          // [N, d] row-major
  const T* log_w;      // [N] or nullptr
  int64_t N;
  int64_t d;
  double bandwidth;
};

// alpha, sigma: device arrays of length M (per_row) or 1. d > kCudaMaxD returns cudaErrorInvalidValue.
template <typename T>
cudaError_t launch_posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma,
                             bool per_row, T* D, T* L, cudaStream_t stream);

// out = A x + B D + C z, then out += B1 D1, then out += B2 D2 (D1/D2: the multistep history [M, d], null when
// unused; a zero coefficient reads nothing); out may alias x.
template <typename T>
cudaError_t launch_affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C,
                               uint64_t seed, uint32_t step, uint64_t sample_offset, cudaStream_t stream,
                               const T* D1 = nullptr, double B1 = 0.0, const T* D2 = nullptr, double B2 = 0.0);

// Fused for d <= 64 (D stays in registers); larger d runs posterior into `scratch` [M, d + 1] then the step.
// alpha, sigma: device scalars.
template <typename T>
cudaError_t launch_pointcloud_step(const Cloud<T>& c, const T* x, T* out, int64_t M, const double* alpha,
                                   const double* sigma, double A, double B, double C, uint64_t seed, uint32_t step,
                                   uint64_t sample_offset, T* scratch, cudaStream_t stream);

// Every row of a step table (csrc/common/table.h, float64 [K, kTableWidth] row-major): `table` in device memory,
// `table_host` the same rows in host memory (the large-d path passes each step's A, B0, C by value). x updated in
// place, step k with noise step index k; traj [K+1, M, d] or nullptr. One launch for d <= 64 (queries stay in
// registers across steps); larger d queues two launches per step on the stream (no host synchronisation), three
// with multistep columns, up to six for a churned or two-stage row (five, and the multistep terms), using scratch of
// pointcloud_sample_scratch(M, d, history_depth(table_host, K), table_has_stages(table_host, K)) elements.
// The multistep columns B1/B2 use the D's of the earlier rows (registers for d <= 64, scratch beyond); the table's
// first rows must not use D's from before row 0 (first_row_before_history: the glue refuses such tables).
inline int64_t pointcloud_sample_scratch(int64_t M, int64_t d, int history, bool stages) {
  // D and L [M, d + 1], then the past D's, then the stage point and its D
  return d > 64 ? M * (d + 1) + history * M * d + (stages ? 2 * M * d : 0) : 0;
}
template <typename T>
cudaError_t launch_pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* table,
                                     const double* table_host, uint64_t seed, uint64_t sample_offset, T* traj,
                                     T* scratch, cudaStream_t stream);

}  // namespace fastdiff::cuda
