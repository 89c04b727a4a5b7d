// Glue for whole point-cloud trajectories: every row of a step table (csrc/common/table.h), x updated in place.
#include "../cpu/kernels.h"
#include "common.h"
#include "ops.h"
#ifdef FASTDIFF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/kernels.cuh"
#endif

namespace fastdiff::ops {

std::optional<at::Tensor> pointcloud_sample(at::Tensor& x_io, const at::Tensor& data_in, const at::Tensor& table,
                                            uint64_t seed, uint64_t sample_offset,
                                            const std::optional<at::Tensor>& log_weights, double bandwidth,
                                            bool return_trajectory) {
  check_points(x_io, "x");
  check_supported_device(x_io);
  check_step_table(table);
  TORCH_CHECK(bandwidth >= 0, "bandwidth must be >= 0, got ", bandwidth);
  check_sample_range(sample_offset, x_io.size(0));
  const int64_t M = x_io.size(0), d = x_io.size(1), K = table.size(0);
  if (!x_io.is_cpu()) check_cuda_d(d, "pointcloud_sample");
  const at::Tensor data = prepare_data(data_in, x_io);
  const int64_t N = data.size(0);
  const auto lw = prepare_log_weights(log_weights, x_io, N);
  std::optional<at::Tensor> traj;
  if (return_trajectory) traj = at::empty({K + 1, M, d}, x_io.options());
  if (M == 0) return traj;
  // x is updated in place: a strided x is run as a contiguous copy, written back at the end
  at::Tensor x = writable(x_io);
  if (!x.is_same(x_io)) x.copy_(x_io);
  const double* table_host = table.data_ptr<double>();
  if (x.is_cpu()) {
    const at::Tensor yT = transposed_for_small_d(data);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_pointcloud_sample_cpu", [&] {
      const cpu::Cloud<scalar_t> c{ptr_or_null<scalar_t>(yT), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth,
                                   data.data_ptr<scalar_t>()};
      cpu::pointcloud_sample<scalar_t>(c, x.data_ptr<scalar_t>(), M, K, table_host, seed, sample_offset,
                                       traj ? traj->data_ptr<scalar_t>() : nullptr);
    });
    finish_out(x_io, x);
    return traj;
  }
#ifdef FASTDIFF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor table_dev = table.to(x.device());   // the one host-to-device copy of the table per call
  const int64_t scratch_elems =
      cuda::pointcloud_sample_scratch(M, d, history_depth(table_host, K), table_has_stages(table_host, K));
  at::Tensor scratch = scratch_elems ? at::empty({scratch_elems}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdiff_pointcloud_sample_cuda", [&] {
    const cuda::Cloud<scalar_t> c{data.data_ptr<scalar_t>(), lw ? lw->data_ptr<scalar_t>() : nullptr, N, d, bandwidth};
    const cudaError_t err = cuda::launch_pointcloud_sample<scalar_t>(
        c, x.data_ptr<scalar_t>(), M, K, table_dev.data_ptr<double>(), table_host, seed, sample_offset,
        traj ? traj->data_ptr<scalar_t>() : nullptr, scratch.defined() ? scratch.data_ptr<scalar_t>() : nullptr,
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastdiff pointcloud_sample CUDA launch failed: ", cudaGetErrorString(err));
  });
#endif
  finish_out(x_io, x);
  return traj;
}

}  // namespace fastdiff::ops
