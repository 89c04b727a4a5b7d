// CUDA affine sampler update with in-kernel noise: one thread per (row, group of 4 components), one
// Philox call per thread. out may alias x. The multistep history D_{k−1}, D_{k−2} (null when unused) is added after
// the one-step update, term by term in T (as the whole-trajectory kernels' add_history_small_d).
#include "common.cuh"

namespace fastdiff::cuda {
namespace {

template <typename T>
__global__ void affine_step_kernel(const T* x, const T* D, T* out, int64_t M, int64_t d, T A, T B, T C,
                                   bool noise, uint64_t seed, uint32_t step, uint64_t sample_offset, const T* D1,
                                   T B1, const T* D2, T B2) {
  const int64_t quads = (d + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= M * quads) return;
  const int64_t i = g / quads, q = g % quads;
  T z[4] = {T(0), T(0), T(0), T(0)};
  if (noise) normals4(seed, sample_offset + static_cast<uint64_t>(i), step, static_cast<uint32_t>(q), z);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t k = 4 * q + e;
    if (k >= d) continue;
    T v = A * x[i * d + k] + B * D[i * d + k] + C * z[e];
    if (D1 != nullptr) v = v + B1 * D1[i * d + k];
    if (D2 != nullptr) v = v + B2 * D2[i * d + k];
    out[i * d + k] = v;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C,
                               uint64_t seed, uint32_t step, uint64_t sample_offset, cudaStream_t stream,
                               const T* D1, double B1, const T* D2, double B2) {
  const int64_t work = M * ((d + 3) / 4);
  if (work == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((work + threads - 1) / threads);
  FD_LAUNCH(blocks, threads, 0, stream, affine_step_kernel<T>)(x, D, out, M, d, static_cast<T>(A), static_cast<T>(B),
                                                               static_cast<T>(C), C != 0.0, seed, step, sample_offset,
                                                               B1 != 0.0 ? D1 : nullptr, static_cast<T>(B1),
                                                               B2 != 0.0 ? D2 : nullptr, static_cast<T>(B2));
  return cudaGetLastError();
}

template cudaError_t launch_affine_step<float>(const float*, const float*, float*, int64_t, int64_t, double, double,
                                               double, uint64_t, uint32_t, uint64_t, cudaStream_t, const float*,
                                               double, const float*, double);
template cudaError_t launch_affine_step<double>(const double*, const double*, double*, int64_t, int64_t, double,
                                                double, double, uint64_t, uint32_t, uint64_t, cudaStream_t,
                                                const double*, double, const double*, double);

}  // namespace fastdiff::cuda
