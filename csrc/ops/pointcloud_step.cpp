// Glue for the fused point-cloud step: checks, allocation, CPU/CUDA dispatch.
#include "../cpu/kernels.h"
#include "common.h"
#include "ops.h"
#ifdef FASTDIFF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/kernels.cuh"
#endif

namespace fastdiff::ops {

at::Tensor pointcloud_step(const at::Tensor& x_in, const at::Tensor& data_in, const at::Tensor& alpha,
                           const at::Tensor& sigma, double A, double B, double C, uint64_t seed, uint32_t step,
                           uint64_t sample_offset, const std::optional<at::Tensor>& log_weights, double bandwidth,
                           const std::optional<at::Tensor>& out_in) {
  check_points(x_in, "x");
  check_supported_device(x_in);
  TORCH_CHECK(bandwidth >= 0, "bandwidth must be >= 0, got ", bandwidth);
  TORCH_CHECK(alpha.numel() == 1 && sigma.numel() == 1, "pointcloud_step takes scalar alpha and sigma (one time step)");
  check_sample_range(sample_offset, x_in.size(0));
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), d = x.size(1);
  const at::Tensor data = prepare_data(data_in, x);
  const int64_t N = data.size(0);
  const auto lw = prepare_log_weights(log_weights, x, N);
  at::Tensor result = out_in.has_value() ? *out_in : at::empty_like(x);
  TORCH_CHECK(result.sizes() == x.sizes() && result.scalar_type() == x.scalar_type() && result.device() == x.device(),
              "out must be a tensor matching x (", shape_str(x), ", ", x.scalar_type(), ")");
  if (M == 0) return result;
  at::Tensor out = writable(result);
  const Coeffs co = prepare_coeffs(alpha, sigma, M, x.device());
  if (x.is_cpu()) {
    // Rows are independent and each reads only its own x row before writing it: out may alias x.
    const at::Tensor yT = transposed_for_small_d(data);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_pointcloud_step_cpu", [&] {
      const cpu::Cloud<scalar_t> c{ptr_or_null<scalar_t>(yT), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth,
                                   data.data_ptr<scalar_t>()};
      cpu::pointcloud_step<scalar_t>(c, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M,
                                     co.alpha.item<double>(), co.sigma.item<double>(), A, B, C, seed, step,
                                     sample_offset);
    });
    finish_out(result, out);
    return result;
  }
#ifdef FASTDIFF_WITH_CUDA
  check_cuda_d(d, "pointcloud_step");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor scratch = d > 64 ? at::empty({M * (d + 1)}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_pointcloud_step_cuda", [&] {
    const cuda::Cloud<scalar_t> c{data.data_ptr<scalar_t>(), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth};
    const cudaError_t err = cuda::launch_pointcloud_step<scalar_t>(
        c, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, co.alpha.data_ptr<double>(),
        co.sigma.data_ptr<double>(), A, B, C, seed, step, sample_offset,
        scratch.defined() ? scratch.data_ptr<scalar_t>() : nullptr, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastdiff pointcloud_step CUDA launch failed: ", cudaGetErrorString(err));
  });
#endif
  finish_out(result, out);
  return result;
}

}  // namespace fastdiff::ops
