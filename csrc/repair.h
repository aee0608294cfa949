// Shared declarations of the native (C++/CUDA) repair kernels.
//
// The private op `fire::_repair_native` works on rows that the Python layer has already
// laid out: x is (N, D) with unit stride along D (any row stride), directions (K, D) fp32
// contiguous, alpha (K,) or (N, K) fp32 (per-row weights are what the backward pass needs),
// center (D,) and tau (K,) fp32 or absent. It returns out (N, D) contiguous in x's dtype and
// scores (N, K) fp32 (or an empty tensor when not asked for).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace fire {

// The values of fire_kernels.modes.Mode (tests/test_modes.py checks they agree).
enum Mode : int64_t { kShift = 0, kProject = 1, kClamp = 2 };

// The weight of direction k for one row, the only place the C++ kernels state the mode maths:
// shift alpha_k; project alpha_k c_k; clamp alpha_k max(c_k - tau_k, 0).
C10_HOST_DEVICE inline float mode_weight(int64_t mode, float alpha, float c, float tau) {
  if (mode == kProject) return alpha * c;
  if (mode == kClamp) return alpha * (c > tau ? c - tau : 0.f);
  return alpha;
}

inline void check_native_args(const at::Tensor& x, const at::Tensor& directions,
                              const at::Tensor& alpha,
                              const c10::optional<at::Tensor>& center,
                              const c10::optional<at::Tensor>& tau, int64_t mode) {
  TORCH_CHECK(mode >= kShift && mode <= kClamp, "fire::_repair_native: mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK(x.dim() == 2, "fire::_repair_native: x must be (N, D), got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fire::_repair_native: x rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "fire::_repair_native: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t D = x.size(1);
  TORCH_CHECK(directions.dim() == 2 && directions.size(1) == D && directions.size(0) >= 1,
              "fire::_repair_native: directions must be (K, D) with D=", D, ", got ", directions.sizes());
  const int64_t K = directions.size(0);
  TORCH_CHECK(directions.scalar_type() == at::kFloat && directions.is_contiguous(),
              "fire::_repair_native: directions must be contiguous float32");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.is_contiguous(),
              "fire::_repair_native: alpha must be contiguous float32");
  TORCH_CHECK((alpha.dim() == 1 && alpha.size(0) == K) ||
                  (alpha.dim() == 2 && alpha.size(0) == x.size(0) && alpha.size(1) == K),
              "fire::_repair_native: alpha must be (K,) or (N, K), got ", alpha.sizes());
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
  for (const at::Tensor* t : {&directions, &alpha}) {
    TORCH_CHECK(t->device() == x.device(), "fire::_repair_native: all tensors must be on ", x.device());
  }
  if (center.has_value()) TORCH_CHECK(center->device() == x.device(), "fire::_repair_native: center on wrong device");
  if (tau.has_value()) TORCH_CHECK(tau->device() == x.device(), "fire::_repair_native: tau on wrong device");
}

}  // namespace fire
