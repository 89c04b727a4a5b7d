// Glue for the point-cloud posterior: checks, allocation, CPU/CUDA dispatch.
#include "../cpu/kernels.h"
#include "common.h"
#include "ops.h"
#ifdef FASTDIFF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/kernels.cuh"
#endif

namespace fastdiff::ops {

std::tuple<at::Tensor, at::Tensor> posterior(const at::Tensor& x_in, const at::Tensor& data_in, const at::Tensor& alpha,
                                             const at::Tensor& sigma, const std::optional<at::Tensor>& log_weights,
                                             double bandwidth) {
  check_points(x_in, "x");
  check_supported_device(x_in);
  TORCH_CHECK(bandwidth >= 0, "bandwidth must be >= 0, got ", bandwidth);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), d = x.size(1);
  const at::Tensor data = prepare_data(data_in, x);
  const int64_t N = data.size(0);
  const auto lw = prepare_log_weights(log_weights, x, N);
  at::Tensor D = at::empty_like(x);
  at::Tensor L = at::empty({M}, x.options());
  if (M == 0) return {D, L};
  const Coeffs co = prepare_coeffs(alpha, sigma, M, x.device());
  if (x.is_cpu()) {
    const at::Tensor yT = transposed_for_small_d(data);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_posterior_cpu", [&] {
      const cpu::Cloud<scalar_t> c{ptr_or_null<scalar_t>(yT), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth,
                                   data.data_ptr<scalar_t>()};
      cpu::posterior<scalar_t>(c, x.data_ptr<scalar_t>(), M, co.alpha.data_ptr<double>(), co.sigma.data_ptr<double>(),
                               co.per_row, D.data_ptr<scalar_t>(), L.data_ptr<scalar_t>());
    });
    return {D, L};
  }
#ifdef FASTDIFF_WITH_CUDA
  check_cuda_d(d, "posterior");
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_posterior_cuda", [&] {
    const cuda::Cloud<scalar_t> c{data.data_ptr<scalar_t>(), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth};
    const cudaError_t err = cuda::launch_posterior<scalar_t>(
        c, x.data_ptr<scalar_t>(), M, co.alpha.data_ptr<double>(), co.sigma.data_ptr<double>(), co.per_row,
        D.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastdiff posterior CUDA launch failed: ", cudaGetErrorString(err));
  });
#endif
  return {D, L};
}

}  // namespace fastdiff::ops
