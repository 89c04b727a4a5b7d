// The multi-step point-cloud kernel for d <= 64, shared by pointcloud_step.cu (one step) and
// pointcloud_sample.cu (every row of a step table): one thread per query, the query in registers across steps.
// A header of templates like common.cuh; each .cu instantiates what it launches.
#pragma once
#include "../common/table.h"
#include "common.cuh"

namespace fastdiff::cuda {

// Step coefficients: the rows of a device step table (csrc/common/table.h) indexed by k − k0 (whole
// trajectories), or one step's device alpha/sigma with A, B0, C by value (pointcloud_step).
struct StepCoeffs {
  const double* table;   // device [k1 − k0, kTableWidth], or nullptr to use the fields below
  const double* alpha;   // device scalars
  const double* sigma;
  double A, B, C;
};

// The multistep terms of one query after its one-step update, in T as the affine update (x += B1 D_{k−1}, then
// x += B2 D_{k−2}; a zero coefficient reads nothing: the first rows' history is unset), then the history moves
// on: D_{k−2} ← D_{k−1} ← D_k. Registers only (the arrays are indexed by unrolled constants).
template <typename T, int DMAX, int HIST>
__device__ __forceinline__ void add_history_small_d(T (&x)[DMAX], const T (&D)[DMAX], T (&H1)[HIST >= 1 ? DMAX : 1],
                                                    T (&H2)[HIST >= 2 ? DMAX : 1], int d, double B1, double B2) {
  if (B1 != 0.0) {
    const T b = static_cast<T>(B1);
#pragma unroll
    for (int e = 0; e < DMAX; ++e)
      if (e < d) x[e] = x[e] + b * H1[e];
  }
  if constexpr (HIST >= 2) {
    if (B2 != 0.0) {
      const T b = static_cast<T>(B2);
#pragma unroll
      for (int e = 0; e < DMAX; ++e)
        if (e < d) x[e] = x[e] + b * H2[e];
    }
#pragma unroll
    for (int e = 0; e < DMAX; ++e) H2[e] = H1[e];
  }
#pragma unroll
  for (int e = 0; e < DMAX; ++e) H1[e] = D[e];
}

// The parts of a churned or two-stage row (csrc/common/table.h) for one query in registers, each formed in double
// from double normals and rounded once into T, as the CPU kernel (csrc/cpu/update_row.h) forms them. The stage draw
// is drawn again where it is used (stage point, correlated step noise) rather than kept: counter-based noise gives
// the same numbers, and at d = 64 that saves 64 registers a thread.

// out = a x + b D + c z(step), each component formed in double and rounded once (out may be x: same index only):
// the churn x^ = P x + Cchurn z_churn (b = 0) and the stage point u = Ux x^ + UD D + Uz z_stage.
template <typename T, int DMAX>
__device__ __forceinline__ void combine_small_d(T (&out)[DMAX], const T (&x)[DMAX], const T (&D)[DMAX], int d,
                                                double a, double b, double c, uint64_t seed, uint32_t step,
                                                uint64_t sample) {
#pragma unroll
  for (int q = 0; q < (DMAX + 3) / 4; ++q) {
    if (4 * q >= d) break;
    double z[4] = {0.0, 0.0, 0.0, 0.0};
    if (c != 0.0) normals4<double>(seed, sample, step, static_cast<uint32_t>(q), z);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * q + e;
      if (j < d) out[j] = static_cast<T>(a * static_cast<double>(x[j]) + b * static_cast<double>(D[j]) + c * z[e]);
    }
  }
}

// x ← A x^ + B0 D + BU D_u + C w, w = rho z_stage + √(1 − rho²) z_k (Du unread when the row has no stage).
template <typename T, int DMAX>
__device__ __forceinline__ void update_staged_small_d(T (&x)[DMAX], const T (&D)[DMAX], const T (&Du)[DMAX], int d,
                                                      const double* row, uint64_t seed, uint32_t k, uint64_t sample) {
  const double A = row[kColA], B0 = row[kColB0], BU = row[kColBU], C = row[kColC], rho = row[kColRho];
  const double keep = sqrt(1.0 - rho * rho);
#pragma unroll
  for (int q = 0; q < (DMAX + 3) / 4; ++q) {
    if (4 * q >= d) break;
    double z[4] = {0.0, 0.0, 0.0, 0.0}, zs[4] = {0.0, 0.0, 0.0, 0.0};
    if (C != 0.0) {
      normals4<double>(seed, sample, k, static_cast<uint32_t>(q), z);
      if (rho != 0.0) normals4<double>(seed, sample, kStageStepBase + k, static_cast<uint32_t>(q), zs);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * q + e;
      if (j >= d) continue;
      double v = A * static_cast<double>(x[j]) + B0 * static_cast<double>(D[j]);
      if (BU != 0.0) v += BU * static_cast<double>(Du[j]);
      if (C != 0.0) v += C * (rho != 0.0 ? rho * zs[e] + keep * z[e] : z[e]);
      x[j] = static_cast<T>(v);
    }
  }
}

// One churned or two-stage row for the block's queries: churn, D at x^ (into D), for a staged row the stage point
// and D_u (the step's second posterior, in the same launch), then the update. Every thread of the block calls it
// (the posteriors stage data tiles together); `active` threads own a query. Row-uniform branches only.
template <typename T, int DMAX>
__device__ void staged_row_small_d(const Cloud<T>& c, T (&x)[DMAX], T (&D)[DMAX], const double* row, bool active,
                                   T* tile, T* tile_lw, uint64_t seed, uint32_t k, uint64_t sample) {
  const int d = static_cast<int>(c.d);
  if (active && row_churns(row))   // x^ = P x + Cchurn z_churn (b = 0: x stands in for D and adds 0·x)
    combine_small_d<T, DMAX>(x, x, x, d, row[kColP], 0.0, row[kColCchurn], seed, kChurnStepBase + k, sample);
  posterior_small_d<T, DMAX>(c, x, row[kColAlpha], row[kColSigma], active, tile, tile_lw, D, static_cast<T*>(nullptr));
  T Du[DMAX];
#pragma unroll
  for (int e = 0; e < DMAX; ++e) Du[e] = T(0);
  if (row_is_staged(row)) {
    T u[DMAX];
#pragma unroll
    for (int e = 0; e < DMAX; ++e) u[e] = T(0);
    if (active)
      combine_small_d<T, DMAX>(u, x, D, d, row[kColUx], row[kColUD], row[kColUz], seed, kStageStepBase + k, sample);
    posterior_small_d<T, DMAX>(c, u, row[kColAlphaU], row[kColSigmaU], active, tile, tile_lw, Du,
                               static_cast<T*>(nullptr));
  }
  if (active) update_staged_small_d<T, DMAX>(x, D, Du, d, row, seed, k, sample);
}

// One thread per query; steps [k0, k1) (noise step index k); queries stay in registers across steps. traj, when
// given, receives the states after each step at [k + 1] (the caller writes [0]). HIST (0..2): how many past D's
// the table uses (history_depth, csrc/common/table.h); they stay in registers too, and after each one-step update
// x += B1 D_{k−1}, then x += B2 D_{k−2} (a zero coefficient reads nothing). HIST = 0 reads no B1/B2 (one-step
// tables, pointcloud_step): the kernel as it was before the multistep columns. STAGES: the table has churned or
// two-stage rows (table_has_stages), which run staged_row_small_d; its one-step rows run the code of STAGES = false.
// x_in and x_out may be the same array (whole trajectories, and pointcloud_step with out = x): no __restrict__;
// each thread reads its own row before it writes it.
template <typename T, int DMAX, int HIST = 0, bool STAGES = false>
__global__ void pointcloud_steps_kernel(Cloud<T> c, const T* x_in, T* x_out, int64_t M, int64_t k0, int64_t k1,
                                        StepCoeffs co, uint64_t seed, uint64_t sample_offset, T* __restrict__ traj) {
  FD_EXTERN_SHARED(T, tile);
  T* tile_lw = tile + kTile * c.d;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < M;
  const int d = static_cast<int>(c.d);
  T xr[DMAX], Dr[DMAX];
  T H1[HIST >= 1 ? DMAX : 1], H2[HIST >= 2 ? DMAX : 1];   // D_{k−1}, D_{k−2} (unset until written)
#pragma unroll
  for (int k = 0; k < DMAX; ++k) xr[k] = (active && k < d) ? x_in[i * d + k] : T(0);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t t = k - k0;
    const double* row = co.table ? co.table + t * kTableWidth : nullptr;
    bool one_step = true;
    if constexpr (STAGES) {   // (not compiled for one-step tables)
      one_step = row_is_one_step(row);
      if (!one_step)
        staged_row_small_d<T, DMAX>(c, xr, Dr, row, active, tile, tile_lw, seed, static_cast<uint32_t>(k),
                                    sample_offset + i);
    }
    if (one_step) {
      const double alpha = row ? row[kColAlpha] : *co.alpha, sigma = row ? row[kColSigma] : *co.sigma;
      posterior_small_d<T, DMAX>(c, xr, alpha, sigma, active, tile, tile_lw, Dr, static_cast<T*>(nullptr));
    }
    if (active) {
      if (one_step) {
        const double A = row ? row[kColA] : co.A, B = row ? row[kColB0] : co.B, C = row ? row[kColC] : co.C;
        update_small_d<T, DMAX>(xr, Dr, d, A, B, C, seed, static_cast<uint32_t>(k), sample_offset + i);
      }
      if constexpr (HIST > 0) add_history_small_d<T, DMAX, HIST>(xr, Dr, H1, H2, d, row[kColB1], row[kColB2]);
      if (traj) {
#pragma unroll
        for (int e = 0; e < DMAX; ++e)
          if (e < d) traj[((k + 1) * M + i) * d + e] = xr[e];
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < DMAX; ++e)
    if (e < d) x_out[i * d + e] = xr[e];
}

template <typename T, int DMAX, int HIST = 0, bool STAGES = false>
cudaError_t launch_steps_small(const Cloud<T>& c, const T* x_in, T* x_out, int64_t M, int64_t k0, int64_t k1,
                               const StepCoeffs& co, uint64_t seed, uint64_t off, T* traj, cudaStream_t st) {
  const size_t shmem = (kTile * c.d + kTile) * sizeof(T);
  const cudaError_t e =
      opt_in_shared(pointcloud_steps_kernel<T, DMAX, HIST, STAGES>, (kTile * DMAX + kTile) * sizeof(T));
  if (e != cudaSuccess) return e;
  const unsigned blocks = static_cast<unsigned>((M + kThreads - 1) / kThreads);
  FD_LAUNCH(blocks, kThreads, shmem, st, pointcloud_steps_kernel<T, DMAX, HIST, STAGES>)(c, x_in, x_out, M, k0, k1,
                                                                                       co, seed, off, traj);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_steps(const Cloud<T>& c, const T* x_in, T* x_out, int64_t M, int64_t k0, int64_t k1,
                         const StepCoeffs& co, uint64_t seed, uint64_t off, T* traj, cudaStream_t st) {
  if (c.d <= 4) return launch_steps_small<T, 4>(c, x_in, x_out, M, k0, k1, co, seed, off, traj, st);
  if (c.d <= 16) return launch_steps_small<T, 16>(c, x_in, x_out, M, k0, k1, co, seed, off, traj, st);
  return launch_steps_small<T, 64>(c, x_in, x_out, M, k0, k1, co, seed, off, traj, st);
}

}  // namespace fastdiff::cuda
