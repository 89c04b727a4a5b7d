// CUDA affine sampler update with in-kernel noise: one thread per (row, group of 4 components), one
// Philox call per thread. out may alias x.
#include "common.cuh"

namespace fastdiff::cuda {
namespace {

template <typename T>
__global__ void affine_step_kernel(const T* x, const T* D, T* out, int64_t M, int64_t d, T A, T B, T C,
                                   bool noise, uint64_t seed, uint32_t step, uint64_t sample_offset) {
  const int64_t quads = (d + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= M * quads) return;
  const int64_t i = g / quads, q = g % quads;
  T z[4] = {T(0), T(0), T(0), T(0)};
  if (noise) normals4(seed, sample_offset + static_cast<uint64_t>(i), step, static_cast<uint32_t>(q), z);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t k = 4 * q + e;
    if (k < d) out[i * d + k] = A * x[i * d + k] + B * D[i * d + k] + C * z[e];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C,
                               uint64_t seed, uint32_t step, uint64_t sample_offset, cudaStream_t stream) {
  const int64_t work = M * ((d + 3) / 4);
  if (work == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((work + threads - 1) / threads);
  FD_LAUNCH(blocks, threads, 0, stream, affine_step_kernel<T>)(x, D, out, M, d, static_cast<T>(A), static_cast<T>(B),
                                                               static_cast<T>(C), C != 0.0, seed, step, sample_offset);
  return cudaGetLastError();
}

template cudaError_t launch_affine_step<float>(const float*, const float*, float*, int64_t, int64_t, double, double,
                                               double, uint64_t, uint32_t, uint64_t, cudaStream_t);
template cudaError_t launch_affine_step<double>(const double*, const double*, double*, int64_t, int64_t, double,
                                                double, double, uint64_t, uint32_t, uint64_t, cudaStream_t);

}  // namespace fastdiff::cuda
