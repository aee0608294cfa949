// CUDA C++ fallback of the fused repair: used where Triton is missing or switched off
// (FIRE_BACKEND=cuda). One thread block per row: the block reduces the K projections of its
// row, then writes the row with the K directions subtracted (the second read of the row is
// served from L1/L2). Simpler and slower than the Triton kernels; it exists so that a CUDA
// machine without Triton still gets a correct fused op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../repair.h"

namespace fire {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result. `red` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int warps = blockDim.x >> 5;
  for (int i = 0; i < warps; ++i) total += red[i];
  __syncthreads();  // red is reused by the next call
  return total;
}

template <typename scalar_t>
__global__ void repair_rows_kernel(const scalar_t* __restrict__ x, int64_t stride_x,
                                   scalar_t* __restrict__ out, const float* __restrict__ V,
                                   const float* __restrict__ alpha, int64_t stride_alpha,
                                   const float* __restrict__ center, const float* __restrict__ tau,
                                   float* __restrict__ scores, int64_t N, int64_t D, int K,
                                   int mode, bool need_c) {
  extern __shared__ float smem[];
  float* w = smem;           // K per-row weights
  float* red = smem + K;     // one slot per warp
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* xr = x + n * stride_x;
    for (int k = 0; k < K; ++k) {
      float ck = 0.f;
      if (need_c) {
        float acc = 0.f;
        const float* vk = V + k * D;
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
          float xv = static_cast<float>(xr[d]);
          if (center) xv -= center[d];
          acc += xv * vk[d];
        }
        ck = block_sum(acc, red);
        if (scores && threadIdx.x == 0) scores[n * K + k] = ck;
      }
      if (threadIdx.x == 0) {
        w[k] = mode_weight(mode, alpha[n * stride_alpha + k], ck, tau ? tau[k] : 0.f);
      }
    }
    __syncthreads();
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float y = static_cast<float>(xr[d]);
      for (int k = 0; k < K; ++k) y -= w[k] * V[k * D + d];
      out[n * D + d] = static_cast<scalar_t>(y);
    }
    __syncthreads();  // w is rewritten for the next row
  }
}

std::tuple<at::Tensor, at::Tensor> repair_native_cuda(const at::Tensor& x, const at::Tensor& directions,
                                                      const at::Tensor& alpha,
                                                      const c10::optional<at::Tensor>& center,
                                                      const c10::optional<at::Tensor>& tau, int64_t mode,
                                                      bool want_scores) {
  check_native_args(x, directions, alpha, center, tau, mode);
  TORCH_CHECK(x.is_cuda(), "fire::_repair_native (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), K = directions.size(0);
  at::Tensor out = at::empty({N, D}, x.options());
  at::Tensor scores = want_scores ? at::empty({N, K}, x.options().dtype(at::kFloat))
                                  : at::empty({0}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, scores};
  const bool need_c = mode != kShift || want_scores;
  const int blocks = static_cast<int>(std::min<int64_t>(N, 65535));
  const size_t smem = (K + kThreads / 32) * sizeof(float);
  const int64_t stride_alpha = alpha.dim() == 2 ? K : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fire_repair_cuda", [&] {
    repair_rows_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(), directions.data_ptr<float>(),
        alpha.data_ptr<float>(), stride_alpha, center.has_value() ? center->data_ptr<float>() : nullptr,
        tau.has_value() ? tau->data_ptr<float>() : nullptr,
        want_scores ? scores.data_ptr<float>() : nullptr, N, D, static_cast<int>(K),
        static_cast<int>(mode), need_c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(fire, CUDA, m) { m.impl("_repair_native", &repair_native_cuda); }

}  // namespace fire
