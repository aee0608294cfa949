// Shared declarations of the native (C++/CUDA) repair kernels.
//
// The private op `fire::_repair_native` works on rows that the Python layer has already
// laid out: x is (B, P, D), any strides, row (b, p) holding D elements (a flattened sample, or
// the channels at one position); directions (K, D) fp32 contiguous, alpha (K,) or (B*P, K) fp32
// (per-row weights are what the backward pass needs), center (D,), tau (K,) and slope (K,, mode
// invert) fp32 or absent.
// It returns out (empty_like(x): x's strides where x is dense) in x's dtype and scores (B*P, K)
// fp32 (or an empty tensor when not asked for).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace fire {

// The values of fire_kernels.modes.Mode (tests/test_modes.py checks they agree).
enum Mode : int64_t { kShift = 0, kProject = 1, kClamp = 2, kGated = 3, kInvert = 4 };

// The weight of direction k for one row, the only place the C++ kernels state the mode maths:
// shift alpha_k; project alpha_k c_k; clamp alpha_k max(c_k - tau_k, 0); gated and invert
// alpha_k [c_k > tau_k] (invert then rescales the row: invert_share).
// A NaN score stays NaN (so does the row it repairs), as in the reference: written so that a
// comparison with NaN (always false) keeps c_k - tau_k rather than 0 (fmaxf would drop the NaN).
C10_HOST_DEVICE inline float mode_weight(int64_t mode, float alpha, float c, float tau) {
  if (mode == kProject) return alpha * c;
  if (mode == kClamp) {
    const float excess = c - tau;
    return alpha * (excess < 0.f ? 0.f : excess);
  }
  if (mode == kGated || mode == kInvert) {
    const float excess = c - tau;
    return alpha * (excess > 0.f ? 1.f : (excess <= 0.f ? 0.f : excess));
  }
  return alpha;
}

// The modes that compare scores with tau (fire_kernels.modes.TAU_MODES).
C10_HOST_DEVICE inline bool uses_tau(int64_t mode) { return mode == kClamp || mode == kGated || mode == kInvert; }

// Invert: the share u = h / (1 + h), h = sum_k w_k g_k, of the centre in the repaired row,
// y = t + u (mu - t) with t = x - sum_k w_k v_k (w row's weights, g the slope, may be null: 0).
// The one place the C++ kernels state it; u == 0 (no flag, or no slope) leaves y = t exactly.
C10_HOST_DEVICE inline float invert_share(const float* w, const float* slope, int64_t K, int64_t stride_w = 1) {
  if (slope == nullptr) return 0.f;
  float h = 0.f;
  for (int64_t k = 0; k < K; ++k) h += w[k * stride_w] * slope[k];
  return h / (1.f + h);
}

// Where row r = (b, p) of x and out starts, and the stride between a row's D elements: one
// row per sample (flattened), or per sample and position (channels at stride 1 in channels-last
// maps and (N, T, C) tokens, at stride H*W in contiguous NCHW maps).
struct Rows {
  int64_t B, P, D;
  int64_t sxb, sxp, sxd, sob, sop, sod;
  C10_HOST_DEVICE int64_t x_row(int64_t r) const { return (r / P) * sxb + (r % P) * sxp; }
  C10_HOST_DEVICE int64_t out_row(int64_t r) const { return (r / P) * sob + (r % P) * sop; }
};

inline Rows rows_of(const at::Tensor& x, const at::Tensor& out) {
  return Rows{x.size(0),   x.size(1),   x.size(2),   x.stride(0), x.stride(1),
              x.stride(2), out.stride(0), out.stride(1), out.stride(2)};
}

inline void check_native_args(const at::Tensor& x, const at::Tensor& directions,
                              const at::Tensor& alpha,
                              const c10::optional<at::Tensor>& center,
                              const c10::optional<at::Tensor>& tau, int64_t mode,
                              const c10::optional<at::Tensor>& slope) {
  TORCH_CHECK(mode >= kShift && mode <= kInvert, "fire::_repair_native: mode must be 0 to 4, got ", mode);
  TORCH_CHECK(x.dim() == 3, "fire::_repair_native: x must be (B, P, D), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "fire::_repair_native: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t D = x.size(2), rows = x.size(0) * x.size(1);
  TORCH_CHECK(directions.dim() == 2 && directions.size(1) == D && directions.size(0) >= 1,
              "fire::_repair_native: directions must be (K, D) with D=", D, ", got ", directions.sizes());
  const int64_t K = directions.size(0);
  TORCH_CHECK(directions.scalar_type() == at::kFloat && directions.is_contiguous(),
              "fire::_repair_native: directions must be contiguous float32");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.is_contiguous(),
              "fire::_repair_native: alpha must be contiguous float32");
  TORCH_CHECK((alpha.dim() == 1 && alpha.size(0) == K) ||
                  (alpha.dim() == 2 && alpha.size(0) == rows && alpha.size(1) == K),
              "fire::_repair_native: alpha must be (K,) or (B*P, K), got ", alpha.sizes());
  if (center.has_value()) {
    TORCH_CHECK(center->scalar_type() == at::kFloat && center->is_contiguous() &&
                    center->dim() == 1 && center->size(0) == D,
                "fire::_repair_native: center must be contiguous float32 (D,)");
  }
  if (tau.has_value()) {
    TORCH_CHECK(tau->scalar_type() == at::kFloat && tau->is_contiguous() && tau->dim() == 1 &&
                    tau->size(0) == K,
                "fire::_repair_native: tau must be contiguous float32 (K,)");
  }
  if (slope.has_value()) {
    TORCH_CHECK(mode == kInvert, "fire::_repair_native: slope is only used by mode 4 (invert)");
    TORCH_CHECK(slope->scalar_type() == at::kFloat && slope->is_contiguous() && slope->dim() == 1 &&
                    slope->size(0) == K,
                "fire::_repair_native: slope must be contiguous float32 (K,)");
    TORCH_CHECK(slope->device() == x.device(), "fire::_repair_native: slope on wrong device");
  }
  for (const at::Tensor* t : {&directions, &alpha}) {
    TORCH_CHECK(t->device() == x.device(), "fire::_repair_native: all tensors must be on ", x.device());
  }
  if (center.has_value()) TORCH_CHECK(center->device() == x.device(), "fire::_repair_native: center on wrong device");
  if (tau.has_value()) TORCH_CHECK(tau->device() == x.device(), "fire::_repair_native: tau on wrong device");
}

// The CPU kernel on prepared rows (the body of fire::_repair_native on CPU tensors).
std::tuple<at::Tensor, at::Tensor> repair_native_cpu(const at::Tensor& x, const at::Tensor& directions,
                                                     const at::Tensor& alpha,
                                                     const c10::optional<at::Tensor>& center,
                                                     const c10::optional<at::Tensor>& tau, int64_t mode,
                                                     bool want_scores, const c10::optional<at::Tensor>& slope);

// The CUDA kernel on prepared rows (csrc/cuda/repair_cuda.cu; only in builds with CUDA, which
// define FIRE_WITH_CUDA for the C++ sources too).
std::tuple<at::Tensor, at::Tensor> repair_native_cuda(const at::Tensor& x, const at::Tensor& directions,
                                                      const at::Tensor& alpha,
                                                      const c10::optional<at::Tensor>& center,
                                                      const c10::optional<at::Tensor>& tau, int64_t mode,
                                                      bool want_scores, const c10::optional<at::Tensor>& slope);

// Which devices' eager calls the native kernels serve (the backend decision, made in
// fire_repair/_op/backend.py); the C++ op (csrc/repair_op.cpp) takes those calls itself and
// defers the others to the Python implementation.
void set_native_backends(bool cpu, bool cuda);

}  // namespace fire
