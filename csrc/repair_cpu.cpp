// CPU kernel of the fused repair and the registration of the private native op.
//
// Contiguous rows (flattened samples, channels-last positions, tokens) are processed in blocks
// sized to stay in L2: pass 1 converts each chunk of the block to fp32, centres it (c_k =
// <v_k, x - mu>, not <v_k, x> - <v_k, mu>, which cancels catastrophically when |mu| >> |x - mu|)
// and accumulates the K projections (each V chunk is loaded once for four rows at a
// time); pass 2 re-reads the block (from L2, not memory) and writes it with the K directions
// subtracted. So x is read from memory once and written once, and V is streamed once per
// block rather than once per row.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "repair.h"

namespace fire {
namespace {

constexpr int64_t kMaxRowBlock = 16;  // rows that share one read of each V chunk
constexpr int64_t kChunk = 512;        // fp32 elements per row chunk (2 KiB, stays in L1)
constexpr int64_t kL2Bytes = 512 * 1024;

// 8 floats; compiles to one AVX register with -mavx2, two SSE registers otherwise.
typedef float vec8 __attribute__((vector_size(32)));

inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(vec8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Four dot products of rows a0..a3 with b at once: b is loaded once, and four independent
// accumulators hide the FMA latency.
inline void dot4(const float* a0, const float* a1, const float* a2, const float* a3, const float* b, int64_t n,
                 float* out) {
  vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vec8 vb = load8(b + i);
    s0 += load8(a0 + i) * vb;
    s1 += load8(a1 + i) * vb;
    s2 += load8(a2 + i) * vb;
    s3 += load8(a3 + i) * vb;
  }
  float r0 = hsum(s0), r1 = hsum(s1), r2 = hsum(s2), r3 = hsum(s3);
  for (; i < n; ++i) {
    r0 += a0[i] * b[i];
    r1 += a1[i] * b[i];
    r2 += a2[i] * b[i];
    r3 += a3[i] * b[i];
  }
  out[0] += r0;
  out[1] += r1;
  out[2] += r2;
  out[3] += r3;
}

// RB rows x KB directions of dot products at once: each 8-float load of a row or a direction
// feeds KB or RB multiply-adds, so many directions run at the FMA units' pace rather than the
// loads' (out[r * KB + k] += <a[r], b[k]>).
template <int RB, int KB>
inline void dot_block(const float* const* a, const float* const* b, int64_t n, float* out) {
  vec8 acc[RB][KB] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vec8 xa[RB];
    for (int r = 0; r < RB; ++r) xa[r] = load8(a[r] + i);
    for (int k = 0; k < KB; ++k) {
      const vec8 vb = load8(b[k] + i);
      for (int r = 0; r < RB; ++r) acc[r][k] += xa[r] * vb;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < KB; ++k) {
      float s = hsum(acc[r][k]);
      for (int64_t j = i; j < n; ++j) s += a[r][j] * b[k][j];
      out[r * KB + k] += s;
    }
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  vec8 s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
  }
  float s = hsum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename scalar_t>
inline void load_fp32(const scalar_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// bf16 <-> fp32 on the raw bits, so the compiler vectorises them (c10's scalar conversions
// do not): widening is a shift; narrowing rounds to nearest even, NaN stays NaN.
template <>
inline void load_fp32<c10::BFloat16>(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void subtract(float* __restrict dst, const float* __restrict mu, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] -= mu[i];
}

template <typename scalar_t>
inline void store_cast(const float* __restrict src, scalar_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <>
inline void store_cast<c10::BFloat16>(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(src);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    out[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

// Rows whose elements are contiguous (sxd == sod == 1).
template <typename scalar_t>
void repair_rows(const scalar_t* x, scalar_t* out, const Rows& L, const float* V, const float* alpha,
                 int64_t stride_alpha, const float* mu, const float* tau, float* scores, int64_t K,
                 int64_t mode) {
  const int64_t N = L.B * L.P, D = L.D;
  const bool need_c = mode != kShift || scores != nullptr;
  // Rows per block: as many as keep the block in L2 between the two passes (so x is read from
  // memory once), up to kMaxRowBlock; each V chunk is then reused across the block's rows.
  const int64_t row_bytes = std::max<int64_t>(1, D * static_cast<int64_t>(sizeof(scalar_t)));
  int64_t R = std::clamp<int64_t>(kL2Bytes / (2 * row_bytes), 1, kMaxRowBlock);
  // With many directions, streaming V (K x D) once per block costs more than re-reading the
  // block from L3: share each V chunk across at least 8 rows (measured 10-20% faster at K=16).
  if (K > 4) R = std::max<int64_t>(R, 8);
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, R * D));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(kMaxRowBlock * kChunk), vpack(K * kChunk), wa(kMaxRowBlock * K);
    std::vector<float> c(kMaxRowBlock * K), w(kMaxRowBlock * K), part(4);
    std::vector<int64_t> used(K), active(kMaxRowBlock * K), n_active(kMaxRowBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      const int64_t rows = std::min(R, N - n0);
      // Pass 1: projections c[r][k] = <v_k, x_r - mu>.
      if (need_c) {
        std::fill(c.begin(), c.end(), 0.f);
        for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
          const int64_t len = std::min(kChunk, D - d0);
          for (int64_t r = 0; r < rows; ++r) {
            load_fp32(x + L.x_row(n0 + r) + d0, buf.data() + r * kChunk, len);
            if (mu) subtract(buf.data() + r * kChunk, mu + d0, len);
          }
          int64_t k0 = 0;
          for (; k0 + 4 <= K; k0 += 4) {  // four directions at a time, two rows at a time
            const float* vs[4] = {V + k0 * D + d0, V + (k0 + 1) * D + d0, V + (k0 + 2) * D + d0,
                                  V + (k0 + 3) * D + d0};
            int64_t r = 0;
            for (; r + 2 <= rows; r += 2) {
              const float* xs[2] = {buf.data() + r * kChunk, buf.data() + (r + 1) * kChunk};
              float p[8] = {};
              dot_block<2, 4>(xs, vs, len, p);
              for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 4; ++j) c[(r + i) * K + k0 + j] += p[i * 4 + j];
            }
            for (; r < rows; ++r) {
              const float* xs[1] = {buf.data() + r * kChunk};
              float p[4] = {};
              dot_block<1, 4>(xs, vs, len, p);
              for (int j = 0; j < 4; ++j) c[r * K + k0 + j] += p[j];
            }
          }
          for (int64_t k = k0; k < K; ++k) {
            const float* vk = V + k * D + d0;
            int64_t r = 0;
            for (; r + 4 <= rows; r += 4) {
              const float* b = buf.data() + r * kChunk;
              part[0] = part[1] = part[2] = part[3] = 0.f;
              dot4(b, b + kChunk, b + 2 * kChunk, b + 3 * kChunk, vk, len, part.data());
              for (int i = 0; i < 4; ++i) c[(r + i) * K + k] += part[i];
            }
            for (; r < rows; ++r) c[r * K + k] += dot(buf.data() + r * kChunk, vk, len);
          }
        }
        if (scores)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < K; ++k) scores[(n0 + r) * K + k] = c[r * K + k];
      }
      // Per-row weight of each direction.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) {
          w[r * K + k] = mode_weight(mode, alpha[(n0 + r) * stride_alpha + k], c[r * K + k], tau ? tau[k] : 0.f);
        }
      // Pass 2: out = x - sum_k w_k v_k (the block is still in L2 from pass 1). Only the
      // directions with a non-zero weight are applied (clamp leaves most at zero), and all of
      // them are summed in registers, one load and one store of y per 8 elements. The chunks
      // of the directions some row of the block applies are packed side by side (rows of V
      // lie D floats apart, often a multiple of 4 KiB, where many streams read in step share
      // L1 sets); each row lists its own (slot in the pack, weight) pairs once per block.
      int64_t n_used = 0;
      for (int64_t k = 0; k < K; ++k) {
        bool any = false;
        for (int64_t r = 0; r < rows && !any; ++r) any = w[r * K + k] != 0.f;
        if (any) used[n_used++] = k;
      }
      for (int64_t r = 0; r < rows; ++r) {
        n_active[r] = 0;
        for (int64_t j = 0; j < n_used; ++j) {
          const float wj = w[r * K + used[j]];
          if (wj != 0.f) active[r * K + n_active[r]] = j, wa[r * K + n_active[r]++] = wj;
        }
      }
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t len = std::min(kChunk, D - d0);
        for (int64_t j = 0; j < n_used; ++j) std::memcpy(vpack.data() + j * kChunk, V + used[j] * D + d0, len * 4);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t na = n_active[r];
          const int64_t* act = active.data() + r * K;
          const float* wr = wa.data() + r * K;
          float* y = buf.data();
          load_fp32(x + L.x_row(n0 + r) + d0, y, len);
          int64_t i = 0;
          // four independent accumulators: one chain of K dependent multiply-adds per 8
          // elements would run at the FMA latency, not its throughput
          for (; i + 32 <= len; i += 32) {
            vec8 a0 = load8(y + i), a1 = load8(y + i + 8), a2 = load8(y + i + 16), a3 = load8(y + i + 24);
            for (int64_t j = 0; j < na; ++j) {
              const float* vj = vpack.data() + act[j] * kChunk + i;
              const float wj = wr[j];
              a0 -= wj * load8(vj);
              a1 -= wj * load8(vj + 8);
              a2 -= wj * load8(vj + 16);
              a3 -= wj * load8(vj + 24);
            }
            std::memcpy(y + i, &a0, sizeof(a0));
            std::memcpy(y + i + 8, &a1, sizeof(a1));
            std::memcpy(y + i + 16, &a2, sizeof(a2));
            std::memcpy(y + i + 24, &a3, sizeof(a3));
          }
          for (; i + 8 <= len; i += 8) {
            vec8 acc = load8(y + i);
            for (int64_t j = 0; j < na; ++j) acc -= wr[j] * load8(vpack.data() + act[j] * kChunk + i);
            std::memcpy(y + i, &acc, sizeof(acc));
          }
          for (; i < len; ++i)
            for (int64_t j = 0; j < na; ++j) y[i] -= wr[j] * vpack[act[j] * kChunk + i];
          store_cast(y, out + L.out_row(n0 + r) + d0, len);
        }
      }
    }
  });
}

// Rows whose elements are strided (the channels of a contiguous NCHW map): a tile of PB
// positions x all D channels is converted to fp32 once (pass 1 reduces the K projections of
// the PB positions, vectorised along positions), then written back from the tile (pass 2).
// x is read once and written once; no transposing copy.
template <typename scalar_t>
void repair_tiles(const scalar_t* x, scalar_t* out, const Rows& L, const float* V, const float* alpha,
                  int64_t stride_alpha, const float* mu, const float* tau, float* scores, int64_t K,
                  int64_t mode) {
  const int64_t P = L.P, D = L.D;
  const bool need_c = mode != kShift || scores != nullptr;
  const int64_t PB = std::clamp<int64_t>((kL2Bytes / 2 / (4 * std::max<int64_t>(D, 1))) / 8 * 8, 8, 256);
  const int64_t pblocks = (P + PB - 1) / PB;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, PB * D));
  at::parallel_for(0, L.B * pblocks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(D * PB), c(K * PB), w(K * PB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / pblocks, p0 = (t % pblocks) * PB, len = std::min(PB, P - p0);
      const scalar_t* xb = x + b * L.sxb + p0 * L.sxp;
      scalar_t* ob = out + b * L.sob + p0 * L.sop;
      for (int64_t d = 0; d < D; ++d) {
        float* dst = tile.data() + d * PB;
        if (L.sxp == 1) {
          load_fp32(xb + d * L.sxd, dst, len);
        } else {
          for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(xb[d * L.sxd + j * L.sxp]);
        }
      }
      if (need_c) {
        for (int64_t k = 0; k < K; ++k) {
          float* ck = c.data() + k * PB;
          for (int64_t j = 0; j < len; ++j) ck[j] = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float v = V[k * D + d], m = mu ? mu[d] : 0.f;
            const float* src = tile.data() + d * PB;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) ck[j] += v * (src[j] - m);
          }
          if (scores)
            for (int64_t j = 0; j < len; ++j) scores[(b * P + p0 + j) * K + k] = ck[j];
        }
      }
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < len; ++j) {
          const int64_t r = b * P + p0 + j;
          w[k * PB + j] = mode_weight(mode, alpha[r * stride_alpha + k], need_c ? c[k * PB + j] : 0.f,
                                      tau ? tau[k] : 0.f);
        }
      for (int64_t d = 0; d < D; ++d) {
        float* y = tile.data() + d * PB;
        for (int64_t k = 0; k < K; ++k) {
          const float v = V[k * D + d];
          const float* wk = w.data() + k * PB;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) y[j] -= wk[j] * v;
        }
        if (L.sop == 1) {
          store_cast(y, ob + d * L.sod, len);
        } else {
          for (int64_t j = 0; j < len; ++j) ob[d * L.sod + j * L.sop] = static_cast<scalar_t>(y[j]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> repair_native_cpu(const at::Tensor& x, const at::Tensor& directions,
                                                     const at::Tensor& alpha,
                                                     const c10::optional<at::Tensor>& center,
                                                     const c10::optional<at::Tensor>& tau, int64_t mode,
                                                     bool want_scores) {
  check_native_args(x, directions, alpha, center, tau, mode);
  TORCH_CHECK(x.device().is_cpu(), "fire::_repair_native (CPU): x must be on the CPU");
  const int64_t K = directions.size(0);
  at::Tensor out = at::empty_like(x);  // x's strides where x is dense: no layout change
  at::Tensor scores = want_scores ? at::empty({x.size(0) * x.size(1), K}, x.options().dtype(at::kFloat))
                                  : at::empty({0}, x.options().dtype(at::kFloat));
  const Rows L = rows_of(x, out);
  if (L.B * L.P == 0) return {out, scores};
  if (L.D == 0) {
    if (want_scores) scores.zero_();
    return {out, scores};
  }
  const int64_t stride_alpha = alpha.dim() == 2 ? K : 0;
  const bool unit_rows = (L.D == 1 || (L.sxd == 1 && L.sod == 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fire_repair_cpu", [&] {
    auto run = unit_rows ? &repair_rows<scalar_t> : &repair_tiles<scalar_t>;
    run(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), L, directions.const_data_ptr<float>(),
        alpha.const_data_ptr<float>(), stride_alpha, center.has_value() ? center->const_data_ptr<float>() : nullptr,
        tau.has_value() ? tau->const_data_ptr<float>() : nullptr,
        want_scores ? scores.mutable_data_ptr<float>() : nullptr, K, mode);
  });
  return {out, scores};
}

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
