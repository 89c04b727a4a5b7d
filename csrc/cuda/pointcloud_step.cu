// The fused point-cloud step on CUDA: D of the cloud at (alpha, sigma), then out = A x + B D + C z.
#include "common.cuh"
#include "steps.cuh"

namespace fastdiff::cuda {

template <typename T>
cudaError_t launch_pointcloud_step(const Cloud<T>& c, const T* x, T* out, int64_t M, const double* alpha,
                                   const double* sigma, double A, double B, double C, uint64_t seed, uint32_t step,
                                   uint64_t sample_offset, T* scratch, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (c.d <= 64) {   // D stays in registers
    const StepCoeffs co{nullptr, alpha, sigma, A, B, C};
    return launch_steps<T>(c, x, out, M, step, static_cast<int64_t>(step) + 1, co, seed, sample_offset, nullptr,
                           stream);
  }
  cudaError_t e = launch_posterior<T>(c, x, M, alpha, sigma, false, scratch, scratch + M * c.d, stream);
  if (e != cudaSuccess) return e;
  return launch_affine_step<T>(x, scratch, out, M, c.d, A, B, C, seed, step, sample_offset, stream);
}

#define FD_INSTANTIATE(T)                                                                                \
  template cudaError_t launch_pointcloud_step<T>(const Cloud<T>&, const T*, T*, int64_t, const double*, \
                                                 const double*, double, double, double, uint64_t, uint32_t, \
                                                 uint64_t, T*, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)
#undef FD_INSTANTIATE

}  // namespace fastdiff::cuda
