// Torch-free CUDA kernels: raw pointers, a cudaStream_t, explicit instantiations. Glue in csrc/ops/.
#pragma once
#ifdef FASTDIFF_CUDA_EMU
#include "../emu/cuda_emu.h"   // the tests' CPU emulation of CUDA (csrc/emu/); never in the installed build
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace fastdiff::cuda {

template <typename T>
struct Cloud {
  const T* y;          // [N, d] row-major
  const T* log_w;      // [N] or nullptr
  int64_t N;
  int64_t d;
  double bandwidth;
};

// alpha, sigma: device arrays of length M (per_row) or 1.
template <typename T>
cudaError_t launch_posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma,
                             bool per_row, T* D, T* L, cudaStream_t stream);

template <typename T>
cudaError_t launch_affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C,
                               uint64_t seed, uint32_t step, uint64_t sample_offset, cudaStream_t stream);

// Fused for d <= 64 (D stays in registers); larger d runs posterior into `scratch` [M, d + 1] then the step.
// alpha, sigma: device scalars.
template <typename T>
cudaError_t launch_pointcloud_step(const Cloud<T>& c, const T* x, T* out, int64_t M, const double* alpha,
                                   const double* sigma, double A, double B, double C, uint64_t seed, uint32_t step,
                                   uint64_t sample_offset, T* scratch, cudaStream_t stream);

// All K steps; alpha, sigma, A, B, C are device arrays of length K (A/B/C_host their host copies). One launch
// for d <= 64 (queries stay in registers across steps); larger d queues two launches per step on the stream
// (no host synchronisation), using scratch [M, d + 1].
template <typename T>
cudaError_t launch_pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* alpha,
                                     const double* sigma, const double* A, const double* B, const double* C,
                                     const double* A_host, const double* B_host, const double* C_host,
                                     uint64_t seed, uint64_t sample_offset, T* traj, T* scratch, cudaStream_t stream);

}  // namespace fastdiff::cuda
