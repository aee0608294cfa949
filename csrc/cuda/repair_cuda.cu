// CUDA C++ fallback of the fused repair: used where Triton is missing or switched off
// (FIRE_BACKEND=cuda). Simpler and slower than the Triton kernels; it exists so that a CUDA
// machine without Triton still gets a correct fused op. Two kernels:
// - rows with contiguous elements (flattened samples, channels-last positions, tokens): one
//   thread block per row reduces the K projections, then writes the row with the K directions
//   subtracted (the second read is served from L1/L2);
// - rows with strided elements (the channels of a contiguous NCHW map): a block owns a tile of
//   32 positions (one per lane, so loads are coalesced along positions) x all channels, split
//   over 8 warps, and reduces the K projections of its 32 positions through shared memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../repair.h"

namespace fire {
namespace {

constexpr int kThreads = 256;
constexpr int kTileP = 32;      // positions per tile: one per lane
constexpr int kTileGroups = 8;  // warps splitting a tile's channels

// Everything a kernel needs besides x, out and their layout (passed by value).
struct Params {
  const float* V;       // (K, D) directions
  const float* alpha;   // (K,) or per row (rows, K)
  int64_t stride_alpha; // 0 or K
  const float* center;  // (D,) or null
  const float* tau;     // (K,) or null
  float* scores;        // (rows, K) or null
  const float* slope;   // (K,) or null (mode invert)
  int K, mode;
  bool need_c;          // the projections are needed (not shift without scores)
};

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
__global__ void repair_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, Rows L,
                                   Params args) {
  extern __shared__ float smem[];
  float* w = smem;        // K per-row weights
  float* red = smem + args.K;  // one slot per warp
  const int64_t N = L.B * L.P, D = L.D;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* xr = x + L.x_row(n);
    for (int k = 0; k < args.K; ++k) {
      float ck = 0.f;
      if (args.need_c) {
        float acc = 0.f;
        const float* vk = args.V + k * D;
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
          float xv = static_cast<float>(xr[d * L.sxd]);
          if (args.center) xv -= args.center[d];
          acc += xv * vk[d];
        }
        ck = block_sum(acc, red);
        if (args.scores && threadIdx.x == 0) args.scores[n * args.K + k] = ck;
      }
      if (threadIdx.x == 0) {
        w[k] = mode_weight(args.mode, args.alpha[n * args.stride_alpha + k], ck, args.tau ? args.tau[k] : 0.f);
      }
    }
    __syncthreads();
    const float u = args.mode == kInvert ? invert_share(w, args.slope, args.K) : 0.f;
    scalar_t* orow = out + L.out_row(n);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float y = static_cast<float>(xr[d * L.sxd]);
      for (int k = 0; k < args.K; ++k) y -= w[k] * args.V[k * D + d];
      if (u != 0.f) y += u * ((args.center ? args.center[d] : 0.f) - y);
      orow[d * L.sod] = static_cast<scalar_t>(y);
    }
    __syncthreads();  // w is rewritten for the next row
  }
}

template <typename scalar_t>
__global__ void repair_tiles_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, Rows L,
                                    Params args) {
  extern __shared__ float smem[];
  float* w = smem;                 // K x kTileP weights
  float* red = smem + args.K * kTileP;  // kTileGroups x kTileP partial sums
  const int lane = threadIdx.x, group = threadIdx.y;
  const int64_t D = L.D, pblocks = (L.P + kTileP - 1) / kTileP;
  for (int64_t t = blockIdx.x; t < L.B * pblocks; t += gridDim.x) {
    const int64_t b = t / pblocks, p = (t % pblocks) * kTileP + lane, r = b * L.P + p;
    const bool live = p < L.P;
    const scalar_t* xp = x + b * L.sxb + p * L.sxp;
    for (int k = 0; k < args.K; ++k) {
      float ck = 0.f;
      if (args.need_c) {
        float acc = 0.f;
        if (live) {
          for (int64_t d = group; d < D; d += kTileGroups) {
            float xv = static_cast<float>(xp[d * L.sxd]);
            if (args.center) xv -= args.center[d];
            acc += xv * args.V[k * D + d];
          }
        }
        red[group * kTileP + lane] = acc;
        __syncthreads();
        if (group == 0)
          for (int g = 0; g < kTileGroups; ++g) ck += red[g * kTileP + lane];  // fixed order
        __syncthreads();  // red is reused by the next direction
      }
      if (group == 0 && live) {
        if (args.scores) args.scores[r * args.K + k] = ck;
        w[k * kTileP + lane] = mode_weight(args.mode, args.alpha[r * args.stride_alpha + k], ck, args.tau ? args.tau[k] : 0.f);
      }
    }
    __syncthreads();
    if (live) {
      const float u = args.mode == kInvert ? invert_share(w + lane, args.slope, args.K, kTileP) : 0.f;
      scalar_t* op = out + b * L.sob + p * L.sop;
      for (int64_t d = group; d < D; d += kTileGroups) {
        float y = static_cast<float>(xp[d * L.sxd]);
        for (int k = 0; k < args.K; ++k) y -= w[k * kTileP + lane] * args.V[k * D + d];
        if (u != 0.f) y += u * ((args.center ? args.center[d] : 0.f) - y);
        op[d * L.sod] = static_cast<scalar_t>(y);
      }
    }
    __syncthreads();  // w is rewritten for the next tile
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> repair_native_cuda(const at::Tensor& x, const at::Tensor& directions,
                                                      const at::Tensor& alpha,
                                                      const c10::optional<at::Tensor>& center,
                                                      const c10::optional<at::Tensor>& tau, int64_t mode,
                                                      bool want_scores, const c10::optional<at::Tensor>& slope) {
  check_native_args(x, directions, alpha, center, tau, mode, slope);
  TORCH_CHECK(x.is_cuda(), "fire::_repair_native (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = directions.size(0);
  at::Tensor out = at::empty_like(x);  // x's strides where x is dense: no layout change
  const int64_t n_rows = x.size(0) * x.size(1);
  at::Tensor scores = want_scores ? at::empty({n_rows, K}, x.options().dtype(at::kFloat))
                                  : at::empty({0}, x.options().dtype(at::kFloat));
  const Rows L = rows_of(x, out);
  if (n_rows == 0) return {out, scores};
  if (L.D == 0) {
    if (want_scores) scores.zero_();
    return {out, scores};
  }
  const bool need_c = mode != kShift || want_scores;
  const int64_t stride_alpha = alpha.dim() == 2 ? K : 0;
  const bool tiles = L.D > 1 && L.sxd != 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fire_repair_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const Params params{directions.const_data_ptr<float>(), alpha.const_data_ptr<float>(), stride_alpha,
                        center.has_value() ? center->const_data_ptr<float>() : nullptr,
                        tau.has_value() ? tau->const_data_ptr<float>() : nullptr,
                        want_scores ? scores.mutable_data_ptr<float>() : nullptr,
                        slope.has_value() ? slope->const_data_ptr<float>() : nullptr, static_cast<int>(K),
                        static_cast<int>(mode), need_c};
    if (tiles) {
      const int64_t n_tiles = L.B * ((L.P + kTileP - 1) / kTileP);
      const int blocks = static_cast<int>(std::min<int64_t>(n_tiles, 65535));
      const size_t smem = (K + kTileGroups) * kTileP * sizeof(float);
      repair_tiles_kernel<scalar_t><<<blocks, dim3(kTileP, kTileGroups), smem, stream>>>(xp, op, L, params);
    } else {
      const int blocks = static_cast<int>(std::min<int64_t>(n_rows, 65535));
      const size_t smem = (K + kThreads / 32) * sizeof(float);
      repair_rows_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(xp, op, L, params);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, scores};
}

TORCH_LIBRARY_IMPL(fire, CUDA, m) { m.impl("_repair_native", &repair_native_cuda); }

}  // namespace fire
