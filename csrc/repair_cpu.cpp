// CPU kernel of the fused repair and the registration of the private native op.
//
// Contiguous rows (flattened samples, channels-last positions, tokens) are processed in blocks
// sized to stay in L2 (at K <= 4): pass 1 converts each chunk of the block to fp32, centres it (c_k =
// <v_k, x - mu>, not <v_k, x> - <v_k, mu>, which cancels catastrophically when |mu| >> |x - mu|)
// and accumulates the K projections (each V chunk is loaded once for four rows at a time; at
// K <= 4 in registers, above through an fp32 buffer read once per four directions); pass 2
// re-reads the block (from L2, not memory) and writes it with the K directions subtracted. So
// x is read from memory once and written once, and V is streamed once per block rather than
// once per row. At K > 4 streaming V costs more than x (K x D fp32 per block
// against R x D elements): blocks of 32 rows, read again from L3 in pass 2.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "repair.h"

namespace fire {
namespace {

constexpr int64_t kMaxRowBlock = 16;   // rows that share one read of each V chunk (K <= 4)
constexpr int64_t kManyRowBlock = 32;  // the same at K > 4
constexpr int64_t kL2Bytes = 512 * 1024;
// Elements per thread at least: at batch 1 a 64 x 32 x 32 map per position (65536 elements)
// took 58 us on one thread at 2^16, 34 us on two at 2^15 (K = 4, fp32); smaller calls lose
// more to waking a thread than they gain.
constexpr int64_t kGrainElements = 1 << 15;

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

// The lane sums of eight vectors at once, as one vector (a transpose by pairwise adds, 12 vector
// operations): one horizontal sum per row and direction cost 7 dependent scalar adds, more
// than the projections of a 64-channel row.
inline vec8 hsum8(const vec8* v) {
  const auto pairs = [](vec8 a, vec8 b) {  // [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vec8 lo = pairs(pairs(v[0], v[1]), pairs(v[2], v[3]));  // halves of v0..v3's sums
  const vec8 hi = pairs(pairs(v[4], v[5]), pairs(v[6], v[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// Eight elements of x to fp32 registers and back, with no buffer in between: a copy through
// memcpy into a scratch row (what the kernel did before) ran at a fraction of the copy speed
// on Zen 3 (glibc's `rep movsb` path). The generic forms convert one element at a time.
template <typename scalar_t>
inline vec8 load8x(const scalar_t* p) {
  vec8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
template <>
inline vec8 load8x<float>(const float* p) {
  return load8(p);
}
// bf16 widening is a shift of the raw bits.
template <>
inline vec8 load8x<c10::BFloat16>(const c10::BFloat16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  vec8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <typename scalar_t>
inline void store8x(scalar_t* p, vec8 v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<scalar_t>(v[i]);
}
template <>
inline void store8x<float>(float* p, vec8 v) {
  std::memcpy(p, &v, sizeof(v));
}
// bf16 narrowing rounds to nearest even on the raw bits; NaN stays NaN (as c10's conversion).
template <>
inline void store8x<c10::BFloat16>(c10::BFloat16* p, vec8 v) {
  u32x8 u;
  std::memcpy(&u, &v, sizeof(u));
  const u32x8 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const u32x8 nan = reinterpret_cast<u32x8>((u & 0x7FFFFFFFu) > 0x7F800000u);
  const u16x8 h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), u16x8);
  std::memcpy(p, &h, sizeof(h));
}

// RB rows x KB directions of dot products at once, over n8 (a multiple of 8) elements: each
// 8-float load of a row or a direction feeds KB or RB multiply-adds, so many directions run at
// the FMA units' pace rather than the loads'. The sums stay 8 lanes wide in acc[r * ld + k]
// between calls and are reduced once per row block (a horizontal sum per chunk cost as much as
// the multiply-adds of a 256-element chunk).
// a[r] points at fp32 rows (mu null) or at x itself, converted and centred on the fly.
template <int RB, int KB, typename T>
inline void dot_block(const T* const* a, const float* mu, const float* const* b, int64_t n8, vec8* acc,
                      int64_t ld) {
  vec8 s[RB][KB];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < KB; ++k) s[r][k] = acc[r * ld + k];
  const auto row8 = [&](int r, int64_t i) {
    vec8 v = load8x(a[r] + i);
    if (mu) v -= load8(mu + i);
    return v;
  };
  int64_t i = 0;
  if constexpr (RB * KB < 4) {
    // Fewer than four sums would chain each multiply-add on the previous one (FMA latency,
    // not throughput: one row at K = 1, 65536 elements, took 41 us, now 30): four partial
    // sums per pair, over 32 elements at a time.
    vec8 t[RB][KB][3] = {};
    for (; i + 32 <= n8; i += 32)
      for (int r = 0; r < RB; ++r)
        for (int k = 0; k < KB; ++k) {
          s[r][k] += row8(r, i) * load8(b[k] + i);
          for (int u = 0; u < 3; ++u) t[r][k][u] += row8(r, i + 8 * (u + 1)) * load8(b[k] + i + 8 * (u + 1));
        }
    for (int r = 0; r < RB; ++r)
      for (int k = 0; k < KB; ++k) s[r][k] += (t[r][k][0] + t[r][k][1]) + t[r][k][2];
  }
  for (; i < n8; i += 8) {
    vec8 xa[RB];
    for (int r = 0; r < RB; ++r) xa[r] = row8(r, i);
    for (int k = 0; k < KB; ++k) {
      vec8 vb = load8(b[k] + i);
#if defined(__AVX__)
      // vb in a register, loaded once: GCC otherwise folds the load into every row's FMA
      // (RB loads of the same 8 floats; 10 loads per 8 FMAs at 2 x 4, the loop's limit)
      if constexpr (RB > 1) asm("" : "+x"(vb));
#endif
      for (int r = 0; r < RB; ++r) s[r][k] += xa[r] * vb;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < KB; ++k) acc[r * ld + k] = s[r][k];
}

// One chunk of `rows` rows projected on the K directions: 8-lane sums into acc[r * K + k], the
// last len % 8 elements into c[r * K + k]. xs[r] points at the chunk of row r (fp32 rows with mu
// null, or x with mu the centre's chunk); vrow(k) at direction k's chunk.
template <typename T, typename VRow>
void project_chunk(const T* const* xs, const float* mu, const VRow& vrow, int64_t rows, int64_t K, int64_t len,
                   vec8* acc, float* c) {
  const int64_t len8 = len / 8 * 8;
  int64_t k0 = 0;
  for (; k0 + 4 <= K; k0 += 4) {  // four directions at a time, two rows at a time
    const float* vs[4] = {vrow(k0), vrow(k0 + 1), vrow(k0 + 2), vrow(k0 + 3)};
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) dot_block<2, 4>(xs + r, mu, vs, len8, acc + r * K + k0, K);
    if (r < rows) dot_block<1, 4>(xs + r, mu, vs, len8, acc + r * K + k0, K);
  }
  for (int64_t k = k0; k < K; ++k) {  // the last K % 4 directions, four rows at a time
    const float* vs[1] = {vrow(k)};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dot_block<4, 1>(xs + r, mu, vs, len8, acc + r * K + k, K);
    for (; r < rows; ++r) dot_block<1, 1>(xs + r, mu, vs, len8, acc + r * K + k, K);
  }
  for (int64_t r = 0; r < rows; ++r)  // the last len % 8 elements
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = len8; i < len; ++i)
        c[r * K + k] += (static_cast<float>(xs[r][i]) - (mu ? mu[i] : 0.f)) * vrow(k)[i];
}

// dst = fp32(src) - mu (mu may be null).
template <typename scalar_t>
inline void load_centered(const scalar_t* __restrict src, const float* __restrict mu, float* __restrict dst,
                          int64_t n, int64_t ahead = 0) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (ahead) __builtin_prefetch(src + i + ahead);
    vec8 v = load8x(src + i);
    if (mu) v -= load8(mu + i);
    std::memcpy(dst + i, &v, sizeof(v));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) - (mu ? mu[i] : 0.f);
}

// A row chunk no direction touches is copied as it is (a bf16 or fp16 round trip through fp32
// is exact, but converting costs more than the copy): 32-byte moves, not memcpy (see above).
template <typename scalar_t>
inline void copy_raw(const scalar_t* __restrict src, scalar_t* __restrict dst, int64_t n) {
  const char* s = reinterpret_cast<const char*>(src);
  char* d = reinterpret_cast<char*>(dst);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  int64_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    vec8 v;
    std::memcpy(&v, s + i, 32);
    std::memcpy(d + i, &v, 32);
  }
  for (; i < bytes; ++i) d[i] = s[i];
}

template <typename scalar_t>
inline void load_fp32(const scalar_t* __restrict src, float* __restrict dst, int64_t n) {
  load_centered<scalar_t>(src, nullptr, dst, n);
}

template <typename scalar_t>
inline void store_cast(const float* __restrict src, scalar_t* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8x(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// y[0, 8U) = x - sum_j wr[j] v_j over the na applied directions, in U independent 8-lane
// accumulators (v_j = vpack + act[j] * chunk): one load and one store of y per 8 elements.
template <int U, typename scalar_t>
inline void subtract_directions(const scalar_t* __restrict xr, scalar_t* __restrict yr, int64_t na,
                                const int64_t* act, const float* wr, const float* vpack, int64_t chunk) {
  vec8 a[U];
  for (int u = 0; u < U; ++u) a[u] = load8x(xr + 8 * u);
  for (int64_t j = 0; j < na; ++j) {
    const float* vj = vpack + act[j] * chunk;
    const float wj = wr[j];
    for (int u = 0; u < U; ++u) a[u] -= wj * load8(vj + 8 * u);
  }
  for (int u = 0; u < U; ++u) store8x(yr + 8 * u, a[u]);
}

// Rows whose elements are contiguous (sxd == sod == 1).
template <typename scalar_t>
void repair_rows(const scalar_t* x, scalar_t* out, const Rows& L, const float* V, const float* alpha,
                 int64_t stride_alpha, const float* mu, const float* tau, float* scores, int64_t K,
                 int64_t mode, const float* slope) {
  const int64_t N = L.B * L.P, D = L.D;
  const bool need_c = mode != kShift || scores != nullptr;
  // Rows per block: as many as keep the block in L2 between the two passes (so x is read from
  // memory once), up to kMaxRowBlock; each V chunk is then reused across the block's rows.
  const int64_t row_bytes = std::max<int64_t>(1, D * static_cast<int64_t>(sizeof(scalar_t)));
  int64_t R = std::clamp<int64_t>(kL2Bytes / (2 * row_bytes), 1, kMaxRowBlock);
  // With many directions, streaming V (K x D) once per block costs more than re-reading the
  // block from L3 (layer3 at batch 256, K = 16: 8 rows 5.2 ms, 32 rows 4.7 ms; K = 4 gains
  // nothing). Never fewer blocks than threads.
  if (K > 4) R = std::max(R, kManyRowBlock);
  const int64_t threads = at::get_num_threads();
  R = std::max<int64_t>(1, std::min(R, (N + threads - 1) / threads));
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, R * D));
  // Elements per row chunk: the K direction chunks (the pack of pass 2) and the block's rows
  // must stay in L1 together, 16 KiB of directions (512 elements up to K = 8, 256 at K = 16).
  const int64_t chunk = std::clamp<int64_t>(4096 / std::max<int64_t>(K, 1) / 32 * 32, 64, 512);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(R * chunk), vpack(K * chunk), wa(R * K), c(R * K), w(R * K), share(R);
    std::vector<vec8> acc(R * K);
    std::vector<int64_t> used(K), active(R * K), n_active(R);
    std::vector<char> keep(R * K);
    std::vector<const scalar_t*> xp(R);
    std::vector<const float*> bp(R);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      const int64_t rows = std::min(R, N - n0);
      // Pass 1: projections c[r][k] = <v_k, x_r - mu>.
      if (need_c) {
        std::fill(acc.begin(), acc.end(), vec8{});
        std::fill(c.begin(), c.end(), 0.f);
        for (int64_t d0 = 0; d0 < D; d0 += chunk) {
          const int64_t len = std::min(chunk, D - d0);
          const auto vrow = [&](int64_t k) { return V + k * D + d0; };
          // At K <= 4 the rows are projected straight from x, converted and centred in
          // registers (x is read at most K times, from L1); above, once into the fp32 buffer.
          if (K <= 4) {
            for (int64_t r = 0; r < rows; ++r) {
              xp[r] = x + L.x_row(n0 + r) + d0;
              if (d0 + 2 * chunk < D)  // the chunk after next, one cache line at a time
                for (int64_t i = 0; i < len; i += 64 / sizeof(scalar_t)) __builtin_prefetch(xp[r] + 2 * chunk + i);
            }
            project_chunk(xp.data(), mu ? mu + d0 : nullptr, vrow, rows, K, len, acc.data(), c.data());
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              load_centered(x + L.x_row(n0 + r) + d0, mu ? mu + d0 : nullptr, buf.data() + r * chunk, len,
                            d0 + 2 * chunk < D ? 2 * chunk : 0);
              bp[r] = buf.data() + r * chunk;
            }
            project_chunk(bp.data(), static_cast<const float*>(nullptr), vrow, rows, K, len, acc.data(), c.data());
          }
        }
        int64_t i = 0;
        for (; i + 8 <= rows * K; i += 8) {
          const vec8 sums = hsum8(acc.data() + i);
          for (int j = 0; j < 8; ++j) c[i + j] += sums[j];
        }
        for (; i < rows * K; ++i) c[i] += hsum(acc[i]);
        if (scores)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < K; ++k) scores[(n0 + r) * K + k] = c[r * K + k];
      }
      // Per-row weight of each direction.
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < K; ++k) {
          w[r * K + k] = mode_weight(mode, alpha[(n0 + r) * stride_alpha + k], c[r * K + k], tau ? tau[k] : 0.f);
        }
        share[r] = mode == kInvert ? invert_share(w.data() + r * K, slope, K) : 0.f;
      }
      // Pass 2: out = x - sum_k w_k v_k (the block is still in L2 from pass 1). Only the
      // directions with a non-zero weight are applied (clamp leaves most at zero), and all of
      // them are summed in registers, one load and one store of y per 8 elements. The chunks
      // of the directions some row of the block applies are packed side by side (rows of V
      // lie D floats apart, often a multiple of 4 KiB, where many streams read in step share
      // L1 sets); each row lists its own (slot in the pack, weight) pairs once per block.
      // A zero weight is skipped only where that is exact: 0 * v_k is 0 only for a finite
      // v_k, and a finite score c_k = <v_k, x - mu> proves v_k finite (one inf or NaN in v_k
      // makes c_k inf or NaN). Shift has no scores to prove it with: all its directions apply.
      // So the IEEE answer of the reference (0 * inf = NaN) on every path, at no extra pass.
      const bool apply_all = mode == kShift;
      for (int64_t i = 0; i < rows * K; ++i) keep[i] = apply_all || w[i] != 0.f || !std::isfinite(c[i]);
      int64_t n_used = 0;
      for (int64_t k = 0; k < K; ++k) {
        bool any = false;
        for (int64_t r = 0; r < rows && !any; ++r) any = keep[r * K + k];
        if (any) used[n_used++] = k;
      }
      // Without branches: whether a clamped weight is zero is a coin toss per row, and the
      // mispredicted branch here took 30 % of a call at 64 channels (perf). (Applying zero
      // weights too, to make pass 2 branch-free on short rows, was slower: 1.0-1.5x, bf16
      // worst, where an untouched row is copied without conversion.)
      for (int64_t r = 0; r < rows; ++r) {
        int64_t na = 0;
        int64_t* act = active.data() + r * K;
        float* wr = wa.data() + r * K;
        for (int64_t j = 0; j < n_used; ++j) {
          const float wj = w[r * K + used[j]];
          act[na] = j, wr[na] = wj;
          na += keep[r * K + used[j]];
        }
        n_active[r] = na;
      }
      for (int64_t d0 = 0; d0 < D; d0 += chunk) {
        const int64_t len = std::min(chunk, D - d0);
        for (int64_t j = 0; j < n_used; ++j) std::memcpy(vpack.data() + j * chunk, V + used[j] * D + d0, len * 4);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t na = n_active[r];
          const int64_t* act = active.data() + r * K;
          const float* wr = wa.data() + r * K;
          const scalar_t* xr = x + L.x_row(n0 + r) + d0;
          scalar_t* yr = out + L.out_row(n0 + r) + d0;
          if (na == 0 && share[r] == 0.f) {  // (a NaN share, e.g. 0 * a NaN slope, is applied)
            copy_raw(xr, yr, len);
            continue;
          }
          if (const float u = share[r]; u != 0.f) {  // invert, a flagged row (rare): rescaled about mu
            for (int64_t i = 0; i < len; ++i) {
              float y = static_cast<float>(xr[i]);
              for (int64_t j = 0; j < na; ++j) y -= wr[j] * vpack[act[j] * chunk + i];
              y += u * ((mu ? mu[d0 + i] : 0.f) - y);
              yr[i] = static_cast<scalar_t>(y);
            }
            continue;
          }
          int64_t i = 0;
          // eight independent accumulators over 64 elements, then four, then one: one chain of
          // K dependent multiply-adds per 8 elements would run at the FMA latency, not its
          // throughput (two FMA units x 4 cycles need 8 chains)
          for (; i + 64 <= len; i += 64) subtract_directions<8>(xr + i, yr + i, na, act, wr, vpack.data() + i, chunk);
          for (; i + 32 <= len; i += 32) subtract_directions<4>(xr + i, yr + i, na, act, wr, vpack.data() + i, chunk);
          for (; i + 8 <= len; i += 8) subtract_directions<1>(xr + i, yr + i, na, act, wr, vpack.data() + i, chunk);
          for (; i < len; ++i) {
            float y = static_cast<float>(xr[i]);
            for (int64_t j = 0; j < na; ++j) y -= wr[j] * vpack[act[j] * chunk + i];
            yr[i] = static_cast<scalar_t>(y);
          }
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
                  int64_t mode, const float* slope) {
  const int64_t P = L.P, D = L.D;
  const bool need_c = mode != kShift || scores != nullptr;
  const int64_t PB = std::clamp<int64_t>((kL2Bytes / 2 / (4 * std::max<int64_t>(D, 1))) / 8 * 8, 8, 256);
  const int64_t pblocks = (P + PB - 1) / PB;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, PB * D));
  at::parallel_for(0, L.B * pblocks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(D * PB), c(K * PB), w(K * PB), share(PB);
    const bool rescale = mode == kInvert && slope != nullptr;
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
      if (rescale)
        for (int64_t j = 0; j < len; ++j) share[j] = invert_share(w.data() + j, slope, K, PB);
      for (int64_t d = 0; d < D; ++d) {
        float* y = tile.data() + d * PB;
        for (int64_t k = 0; k < K; ++k) {
          const float v = V[k * D + d];
          const float* wk = w.data() + k * PB;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) y[j] -= wk[j] * v;
        }
        if (rescale) {
          const float m = mu ? mu[d] : 0.f;
          for (int64_t j = 0; j < len; ++j)
            if (share[j] != 0.f) y[j] += share[j] * (m - y[j]);
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
                                                     bool want_scores, const c10::optional<at::Tensor>& slope) {
  check_native_args(x, directions, alpha, center, tau, mode, slope);
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
        want_scores ? scores.mutable_data_ptr<float>() : nullptr, K, mode,
        slope.has_value() ? slope->const_data_ptr<float>() : nullptr);
  });
  return {out, scores};
}

TORCH_LIBRARY_FRAGMENT(fire, m) {
  m.def(
      "_repair_native(Tensor x, Tensor directions, Tensor alpha, Tensor? center, Tensor? tau, "
      "int mode, bool want_scores, Tensor? slope=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fire, CPU, m) { m.impl("_repair_native", &repair_native_cpu); }

}  // namespace fire

// The importable module: importing it runs the registrations above; its one function tells the
// C++ op which devices' eager calls the native kernels serve (fire_repair._ext.set_native_backends).
namespace {
PyObject* set_native_backends_py(PyObject*, PyObject* args) {
  int cpu = 0, cuda = 0;
  if (!PyArg_ParseTuple(args, "pp", &cpu, &cuda)) return nullptr;
  fire::set_native_backends(cpu != 0, cuda != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_native_backends", set_native_backends_py, METH_VARARGS,
     "set_native_backends(cpu, cuda): whether the native kernels serve eager calls on each device."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
