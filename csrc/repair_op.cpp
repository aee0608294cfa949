// The eager native path of torch.ops.fire.repair and fire::repair_with_scores, in C++.
//
// The ops are defined in Python (fire_repair/ops.py: schema, fake, autograd, the Triton path),
// which also makes the backend decision (fire_repair/_op/backend.py); this file only reads it.
// A served model calls them on every request, and on the CPU the Python body (validation,
// layout, the custom-op wrapper) cost about 100 us a call, 15x the kernel at batch 1. These
// kernels, registered at the CPU and AutogradCPU keys (and CUDA and AutogradCUDA in builds with
// CUDA, for the calls the CUDA C++ kernel serves: FIRE_BACKEND=cuda, or no Triton), take that
// call with no Python on the way:
// - AutogradCPU: an input that needs a gradient goes to the Python twin (`fire::_repair_py`,
//   the same body with its autograd formula); otherwise the call is redispatched below
//   autograd (to the CPU kernel, or to a tensor subclass or dispatch mode, e.g. FakeTensor
//   under torch.compile and export, which then sees fire::repair itself).
// - CPU / CUDA: the inputs the production path prepares (fp32 contiguous directions and centre laid
//   out in x's memory order, as RepairModule keeps them; x dense in some order) are checked,
//   laid out as rows without a copy and sent to the kernel. Anything else (a device the backend
//   decision gives to Triton, e.g. FIRE_BACKEND=triton, a layout that needs a copy, other dtypes,
//   any argument these checks do not accept) goes to the Python twin, which copies what it must
//   and raises the errors that name the argument.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "repair.h"

namespace fire {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using OptInt = c10::optional<int64_t>;
using RepairFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, c10::string_view, OptInt, const OptTensor&);
using ScoresFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const OptTensor&, const OptTensor&, c10::string_view, OptInt,
                                                    const OptTensor&);

constexpr int64_t kMaxK = 64;  // fire_kernels.MAX_K

// The kernel's arguments as rows, and how its output goes back to x's shape.
struct Rows3 {
  at::Tensor x3, V, center;
  std::vector<int64_t> lead;            // the scores' leading shape
  std::vector<int64_t> order;           // flattened: the permutation of x into memory order (empty: none)
  std::vector<int64_t> moved_shape;     // per position: x with the channel dim moved last
  int64_t cd = -1;                      // per position: the channel dim
};

std::optional<int64_t> mode_of(c10::string_view mode) {
  if (mode == "shift") return kShift;
  if (mode == "project") return kProject;
  if (mode == "clamp") return kClamp;
  if (mode == "gated") return kGated;
  if (mode == "invert") return kInvert;
  return std::nullopt;
}

// Which devices' eager calls the native kernels serve: the backend decision, made once in Python
// (fire_repair/_op/backend.py, from FIRE_BACKEND and Triton's presence) and told here through
// set_native_backends at import and on each fire_repair.ops.set_backend. This side only reads
// it: no environment lookup per call. Until Python has told it, every call goes to Python.
std::atomic<bool> native_serves_cpu{false};
std::atomic<bool> native_serves_cuda{false};

bool native_backend_selected(const c10::Device& device) {
  if (device.is_cpu()) return native_serves_cpu.load(std::memory_order_relaxed);
#ifdef FIRE_WITH_CUDA
  if (device.is_cuda()) return native_serves_cuda.load(std::memory_order_relaxed);
#endif
  return false;
}

bool f32_contiguous_on(const at::Tensor& t, const c10::Device& device) {
  return t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous() && t.layout() == at::kStrided;
}

// x's feature dims in memory order (outermost first) if each row is dense in that order.
std::optional<std::vector<int64_t>> physical_perm(const at::Tensor& x) {
  std::vector<int64_t> dims(x.dim() - 1);
  std::iota(dims.begin(), dims.end(), 1);
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  int64_t expected = 1;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    if (x.size(*it) != 1 && x.stride(*it) != expected) return std::nullopt;
    expected *= x.size(*it);
  }
  return dims;
}

// Whether dims [start, end) of t can be viewed as one dim.
bool mergeable(const at::Tensor& t, int64_t start, int64_t end) {
  int64_t prev = -1;
  for (int64_t d = start; d < end; ++d) {
    if (t.size(d) == 1) continue;
    if (prev >= 0 && t.stride(prev) != t.stride(d) * t.size(d)) return false;
    prev = d;
  }
  return true;
}

// t (lead dims, then x's feature dims) as fp32 rows in x's memory order, without a copy.
std::optional<at::Tensor> rows_in_order(const at::Tensor& t, const c10::Device& device, int64_t lead,
                                        at::IntArrayRef feat, const std::vector<int64_t>& perm, int64_t D) {
  if (t.device() != device || t.scalar_type() != at::kFloat) return std::nullopt;
  const bool identity = std::is_sorted(perm.begin(), perm.end());
  if (t.dim() == lead + 1 && t.size(lead) == D) {  // already flat: only in logical order
    if (!identity || !t.is_contiguous()) return std::nullopt;
    return t;
  }
  std::vector<int64_t> flat_shape;
  if (lead) flat_shape.push_back(t.size(0));
  flat_shape.push_back(D);
  if (t.dim() != lead + static_cast<int64_t>(feat.size()) || !t.sizes().slice(lead).equals(feat)) return std::nullopt;
  std::vector<int64_t> order;
  for (int64_t i = 0; i < lead; ++i) order.push_back(i);
  for (int64_t p : perm) order.push_back(p - 1 + lead);
  at::Tensor u = identity ? t : t.permute(order);
  if (!u.is_contiguous()) return std::nullopt;
  return u.view(flat_shape);
}

// The no-copy row layout of a valid call (every tensor on x's device), or nothing (the Python
// path decides).
std::optional<Rows3> prepare(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& alpha,
                             const OptTensor& center, const OptTensor& tau, int64_t mode, OptInt channel_dim,
                             const OptTensor& slope) {
  const auto dt = x.scalar_type();
  const c10::Device dev = x.device();
  if (x.layout() != at::kStrided || x.dim() < 1 || (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16))
    return std::nullopt;
  if (directions.dim() < 2 || directions.device() != dev) return std::nullopt;
  const int64_t K = directions.size(0);
  if (K < 1 || K > kMaxK || !f32_contiguous_on(alpha, dev) || alpha.dim() != 1 || alpha.size(0) != K)
    return std::nullopt;
  if (tau.has_value() && (!uses_tau(mode) || !f32_contiguous_on(*tau, dev) || tau->dim() != 1 || tau->size(0) != K))
    return std::nullopt;
  if (slope.has_value() &&
      (mode != kInvert || !f32_contiguous_on(*slope, dev) || slope->dim() != 1 || slope->size(0) != K))
    return std::nullopt;
  Rows3 r;
  if (!channel_dim.has_value()) {  // flattened: one row per sample
    const auto feat = x.sizes().slice(1);
    const int64_t N = x.size(0), D = c10::multiply_integers(feat);
    auto perm = physical_perm(x);
    if (!perm) return std::nullopt;  // rows not dense in any order: Python copies x
    const bool identity = std::is_sorted(perm->begin(), perm->end());
    std::vector<int64_t> order{0};
    order.insert(order.end(), perm->begin(), perm->end());
    const at::Tensor xp = identity ? x : x.permute(order);
    auto V = rows_in_order(directions, dev, 1, feat, *perm, D);
    if (!V) return std::nullopt;
    if (center.has_value()) {
      auto mu = rows_in_order(*center, dev, 0, feat, *perm, D);
      if (!mu) return std::nullopt;
      r.center = *mu;
    }
    r.x3 = xp.reshape({1, N, D});
    r.V = *V;
    r.lead = {N};
    if (!identity) r.order = order;
    r.moved_shape = xp.sizes().vec();
    return r;
  }
  // per position: the channels at each position form a row
  const int64_t ndim = x.dim();
  if (ndim < 2 || *channel_dim < -ndim || *channel_dim >= ndim) return std::nullopt;
  const int64_t cd = (*channel_dim + ndim) % ndim;
  if (cd == 0) return std::nullopt;
  const at::Tensor xm = x.movedim(cd, -1);
  const int64_t N = xm.size(0), C = xm.size(-1);
  const int64_t P = c10::multiply_integers(xm.sizes().slice(1, ndim - 2));
  if (directions.dim() != 2 || directions.size(1) != C || !f32_contiguous_on(directions, dev)) return std::nullopt;
  if (center.has_value()) {
    if (!f32_contiguous_on(*center, dev) || center->dim() != 1 || center->size(0) != C) return std::nullopt;
    r.center = *center;
  }
  if (mergeable(xm, 0, ndim - 1)) {
    r.x3 = xm.reshape({1, N * P, C});
  } else if (mergeable(xm, 1, ndim - 1)) {
    r.x3 = xm.reshape({N, P, C});
  } else {
    return std::nullopt;  // positions not addressable with one stride: Python copies x
  }
  r.V = directions;
  for (int64_t d = 0; d < ndim; ++d)
    if (d != cd) r.lead.push_back(x.size(d));
  r.moved_shape = xm.sizes().vec();
  r.cd = cd;
  return r;
}

at::Tensor restore(const Rows3& r, const at::Tensor& out3) {
  at::Tensor out = out3.reshape(r.moved_shape);
  if (r.cd >= 0) return out.movedim(-1, r.cd);
  if (r.order.empty()) return out;
  std::vector<int64_t> inverse(r.order.size());
  for (size_t i = 0; i < r.order.size(); ++i) inverse[r.order[i]] = static_cast<int64_t>(i);
  return out.permute(inverse);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> try_native(const at::Tensor& x, const at::Tensor& directions,
                                                             const at::Tensor& alpha, const OptTensor& center,
                                                             const OptTensor& tau, c10::string_view mode_name,
                                                             OptInt channel_dim, const OptTensor& slope,
                                                             bool want_scores) {
  const auto mode = mode_of(mode_name);
  if (!mode || !native_backend_selected(x.device())) return std::nullopt;
  auto r = prepare(x, directions, alpha, center, tau, *mode, channel_dim, slope);
  if (!r) return std::nullopt;
  auto kernel = &repair_native_cpu;
#ifdef FIRE_WITH_CUDA
  if (x.is_cuda()) kernel = &repair_native_cuda;
#endif
  auto [out3, scores] = kernel(r->x3, r->V, alpha, r->center.defined() ? OptTensor(r->center) : OptTensor(), tau,
                               *mode, want_scores, slope);
  if (want_scores) {
    auto shape = r->lead;
    shape.push_back(directions.size(0));
    scores = scores.reshape(shape);
  }
  return std::make_tuple(restore(*r, out3), scores);
}

// Looked up on first use: the ops are defined by Python after this library is loaded.
template <typename Fn>
c10::TypedOperatorHandle<Fn> lookup(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

bool needs_grad(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& alpha, const OptTensor& center,
                const OptTensor& tau, const OptTensor& slope) {
  if (!at::GradMode::is_enabled()) return false;
  return x.requires_grad() || directions.requires_grad() || alpha.requires_grad() ||
         (center.has_value() && center->requires_grad()) || (tau.has_value() && tau->requires_grad()) ||
         (slope.has_value() && slope->requires_grad());
}

// The two public ops, each with its Python twin.
struct Repair {
  using Ret = at::Tensor;
  using Fn = RepairFn;
  static constexpr const char* self = "fire::repair";
  static constexpr const char* python = "fire::_repair_py";
  static constexpr bool scores = false;
};
struct RepairWithScores {
  using Ret = std::tuple<at::Tensor, at::Tensor>;
  using Fn = ScoresFn;
  static constexpr const char* self = "fire::repair_with_scores";
  static constexpr const char* python = "fire::_repair_with_scores_py";
  static constexpr bool scores = true;
};

template <typename Op>
typename Op::Ret native_kernel(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& alpha,
                               const OptTensor& center, const OptTensor& tau, c10::string_view mode,
                               OptInt channel_dim, const OptTensor& slope) {
  if (auto res = try_native(x, directions, alpha, center, tau, mode, channel_dim, slope, Op::scores)) {
    if constexpr (Op::scores) {
      return *res;
    } else {
      return std::get<0>(*res);
    }
  }
  static const auto python = lookup<typename Op::Fn>(Op::python);
  return python.call(x, directions, alpha, center, tau, mode, channel_dim, slope);
}

template <typename Op>
typename Op::Ret autograd_kernel(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& alpha,
                                 const OptTensor& center, const OptTensor& tau, c10::string_view mode,
                                 OptInt channel_dim, const OptTensor& slope) {
  static const auto python = lookup<typename Op::Fn>(Op::python);
  static const auto self = lookup<typename Op::Fn>(Op::self);
  if (needs_grad(x, directions, alpha, center, tau, slope))
    return python.call(x, directions, alpha, center, tau, mode, channel_dim, slope);
  at::AutoDispatchBelowADInplaceOrView guard;
  return self.call(x, directions, alpha, center, tau, mode, channel_dim, slope);
}

// The same kernels for each device's dispatch keys (CPU, and CUDA in builds with CUDA).
void register_native(torch::Library& m) {
  m.impl("repair", &native_kernel<Repair>);
  m.impl("repair_with_scores", &native_kernel<RepairWithScores>);
}

void register_autograd(torch::Library& m) {
  m.impl("repair", &autograd_kernel<Repair>);
  m.impl("repair_with_scores", &autograd_kernel<RepairWithScores>);
}

}  // namespace

void set_native_backends(bool cpu, bool cuda) {
  native_serves_cpu.store(cpu, std::memory_order_relaxed);
  native_serves_cuda.store(cuda, std::memory_order_relaxed);
}

TORCH_LIBRARY_IMPL(fire, CPU, m) { register_native(m); }
TORCH_LIBRARY_IMPL(fire, AutogradCPU, m) { register_autograd(m); }
#ifdef FIRE_WITH_CUDA
TORCH_LIBRARY_IMPL(fire, CUDA, m) { register_native(m); }
TORCH_LIBRARY_IMPL(fire, AutogradCUDA, m) { register_autograd(m); }
#endif

}  // namespace fire
