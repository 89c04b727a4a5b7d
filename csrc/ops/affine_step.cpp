// Glue for the affine update with in-kernel noise.
#include "../cpu/kernels.h"
#include "common.h"
#include "ops.h"
#ifdef FASTDIFF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/kernels.cuh"
#endif

namespace fastdiff::ops {
namespace {

// A history term D_j of the affine step in x's dtype, contiguous; undefined when unused (none, or B_j == 0: a zero
// coefficient reads nothing).
at::Tensor history_term(const std::optional<at::Tensor>& Dj, double Bj, const at::Tensor& x, const char* name) {
  if (!Dj.has_value() || Bj == 0.0) return at::Tensor();
  TORCH_CHECK(Dj->sizes() == x.sizes(), name, " must have the shape of x ", shape_str(x), ", got ", shape_str(*Dj));
  check_device(*Dj, x, name, "x");
  return Dj->to(x.scalar_type()).contiguous();
}

}  // namespace

at::Tensor affine_step(const at::Tensor& x_in, const at::Tensor& D_in, double A, double B, double C, uint64_t seed,
                       uint32_t step, uint64_t sample_offset, const std::optional<at::Tensor>& out_in,
                       const std::optional<at::Tensor>& D1_in, double B1, const std::optional<at::Tensor>& D2_in,
                       double B2) {
  check_points(x_in, "x");
  check_supported_device(x_in);
  TORCH_CHECK(D_in.sizes() == x_in.sizes(), "D must have the shape of x ", shape_str(x_in), ", got ", shape_str(D_in));
  check_device(D_in, x_in, "D", "x");
  check_sample_range(sample_offset, x_in.size(0));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor D = D_in.to(x.scalar_type()).contiguous();
  const at::Tensor D1 = history_term(D1_in, B1, x, "D1"), D2 = history_term(D2_in, B2, x, "D2");
  at::Tensor result;
  if (out_in.has_value()) {
    result = *out_in;
    TORCH_CHECK(result.sizes() == x.sizes() && result.scalar_type() == x.scalar_type() && result.device() == x.device(),
                "out must match x (", shape_str(x), ", ", x.scalar_type(), ", ", x.device(), "), got ",
                shape_str(result), ", ", result.scalar_type(), ", ", result.device());
  } else {
    result = at::empty_like(x);
  }
  const int64_t M = x.size(0), d = x.size(1);
  if (M == 0) return result;
  at::Tensor out = writable(result);
  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_affine_step_cpu", [&] {
      const cpu::AffineHistory<scalar_t> history{ptr_or_null<scalar_t>(D1), B1, ptr_or_null<scalar_t>(D2), B2};
      cpu::affine_step<scalar_t>(x.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, d, A, B,
                                 C, seed, step, sample_offset, history);
    });
  }
#ifdef FASTDIFF_WITH_CUDA
  else {
    const c10::cuda::CUDAGuard guard(x.device());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_affine_step_cuda", [&] {
      const cudaError_t err = cuda::launch_affine_step<scalar_t>(
          x.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, d, A, B, C, seed, step,
          sample_offset, c10::cuda::getCurrentCUDAStream(), ptr_or_null<scalar_t>(D1), B1, ptr_or_null<scalar_t>(D2),
          B2);
      TORCH_CHECK(err == cudaSuccess, "fastdiff affine_step CUDA launch failed: ", cudaGetErrorString(err));
    });
  }
#endif
  finish_out(result, out);
  return result;
}

}  // namespace fastdiff::ops
