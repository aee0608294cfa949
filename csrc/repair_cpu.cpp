// CPU kernel of the fused repair and the registration of the private native op.
//
// One pass over the rows: a block of rows is converted to fp32 chunk by chunk, the K
// projections are accumulated while the chunk is in L1, then the same rows are written out
// with the K directions subtracted. Each chunk of the direction matrix is reused across the
// rows of a block, so V is streamed once per block rather than once per row.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <Python.h>

#include <algorithm>
#include <vector>

#include "repair.h"

namespace fire {
namespace {

constexpr int64_t kRowBlock = 4;     // rows that share one read of each V chunk
constexpr int64_t kChunk = 1024;     // fp32 elements per row chunk (4 KiB, stays in L1)

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* __restrict v, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] -= w * v[i];
}

template <typename scalar_t>
inline void load_fp32(const scalar_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
inline void store_cast(const float* __restrict src, scalar_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <typename scalar_t>
void repair_rows(const scalar_t* x, int64_t stride_x, scalar_t* out, const float* V,
                 const float* alpha, int64_t stride_alpha, const float* vmu, const float* tau,
                 float* scores, int64_t N, int64_t D, int64_t K, int64_t mode) {
  const bool need_c = mode != kShift || scores != nullptr;
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  // Enough rows per task that a thread streams at least ~64K elements.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, kRowBlock * D));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(kRowBlock * kChunk);
    std::vector<float> c(kRowBlock * K), w(kRowBlock * K);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRowBlock;
      const int64_t rows = std::min(kRowBlock, N - n0);
      // Pass 1: projections c[r][k] = <v_k, x_r> - <v_k, mu>.
      if (need_c) {
        std::fill(c.begin(), c.end(), 0.f);
        for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
          const int64_t len = std::min(kChunk, D - d0);
          for (int64_t r = 0; r < rows; ++r)
            load_fp32(x + (n0 + r) * stride_x + d0, buf.data() + r * kChunk, len);
          for (int64_t k = 0; k < K; ++k) {
            const float* vk = V + k * D + d0;
            for (int64_t r = 0; r < rows; ++r) c[r * K + k] += dot(buf.data() + r * kChunk, vk, len);
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < K; ++k) {
            float ck = c[r * K + k] - (vmu ? vmu[k] : 0.f);
            c[r * K + k] = ck;
            if (scores) scores[(n0 + r) * K + k] = ck;
          }
      }
      // Per-row weight of each direction.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) {
          const float a = alpha[(n0 + r) * stride_alpha + k];
          float g = 1.f;
          if (mode == kProject) g = c[r * K + k];
          if (mode == kClamp) g = std::max(c[r * K + k] - (tau ? tau[k] : 0.f), 0.f);
          w[r * K + k] = a * g;
        }
      // Pass 2: out = x - sum_k w_k v_k (the rows are still in cache from pass 1).
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t len = std::min(kChunk, D - d0);
        for (int64_t r = 0; r < rows; ++r)
          load_fp32(x + (n0 + r) * stride_x + d0, buf.data() + r * kChunk, len);
        for (int64_t k = 0; k < K; ++k) {
          const float* vk = V + k * D + d0;
          for (int64_t r = 0; r < rows; ++r) {
            const float wk = w[r * K + k];
            if (wk != 0.f) axpy(wk, vk, buf.data() + r * kChunk, len);
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          store_cast(buf.data() + r * kChunk, out + (n0 + r) * D + d0, len);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> repair_native_cpu(const at::Tensor& x, const at::Tensor& directions,
                                                     const at::Tensor& alpha,
                                                     const c10::optional<at::Tensor>& center,
                                                     const c10::optional<at::Tensor>& tau, int64_t mode,
                                                     bool want_scores) {
  check_native_args(x, directions, alpha, center, tau, mode);
  TORCH_CHECK(x.device().is_cpu(), "fire::_repair_native (CPU): x must be on the CPU");
  const int64_t N = x.size(0), D = x.size(1), K = directions.size(0);
  at::Tensor out = at::empty({N, D}, x.options());
  at::Tensor scores = want_scores ? at::empty({N, K}, x.options().dtype(at::kFloat))
                                  : at::empty({0}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, scores};
  // <v_k, mu> once per call, so each row only needs <v_k, x>.
  at::Tensor vmu;
  if (center.has_value() && (mode != kShift || want_scores)) vmu = at::mv(directions, *center).contiguous();
  const int64_t stride_alpha = alpha.dim() == 2 ? K : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fire_repair_cpu", [&] {
    repair_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(),
                          directions.data_ptr<float>(), alpha.data_ptr<float>(), stride_alpha,
                          vmu.defined() ? vmu.data_ptr<float>() : nullptr,
                          tau.has_value() ? tau->data_ptr<float>() : nullptr,
                          want_scores ? scores.data_ptr<float>() : nullptr, N, D, K, mode);
  });
  return {out, scores};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fire, m) {
  m.def(
      "_repair_native(Tensor x, Tensor directions, Tensor alpha, Tensor? center, Tensor? tau, "
      "int mode, bool want_scores) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fire, CPU, m) { m.impl("_repair_native", &repair_native_cpu); }

}  // namespace fire

// An importable module with no Python bindings: importing it runs the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
