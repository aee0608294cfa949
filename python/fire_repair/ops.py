"""`torch.ops.fire.repair` and `torch.ops.fire.repair_with_scores`: validation, layout, backend
choice, fake (meta) implementation and autograd.

The public ops are `torch.library.triton_op`s: their body is plain PyTorch plus kernel calls, so
it doubles as the fake implementation and `torch.compile` traces straight through it. The body
sends
- CUDA tensors to the Triton kernels in `fire_kernels` (or to the CUDA C++ fallback when Triton
  is missing or FIRE_BACKEND=cuda);
- CPU tensors to the C++ kernel (`torch.ops.fire._repair_native`, which has its own fake), or to
  the Triton kernels under TRITON_INTERPRET=1 with FIRE_BACKEND=triton (how CI runs them).

Two row forms, chosen by `channel_dim`:
- None (flattened): one row per sample, D = all features. The kernels see rows in x's
  *physical* order, so a channels_last (or any permuted dense) input is never copied; the
  directions and centre are permuted instead (K*D + D elements).
- an int (per position): the channels of x at that dim form a row, one row per sample and
  position (D = C), the same (K, C) directions applied at every position; scores come out per
  position, (N, *positions, K). The kernels take rows at any element stride, so contiguous NCHW
  (channels at stride H*W), channels_last and (N, T, C) tokens are all read in place.
Mode invert (gated, then each flagged row rescaled about the centre by the per-direction
`slope`, see fire_kernels.modes) is the one mode with a seventh argument, `slope` (K,); without
it, invert is gated. Either way `out` comes back in x's memory format. Only inputs whose rows cannot be addressed
with one stride per level (e.g. x[:, ::2] flattened, or per position a map whose positions are
permuted, x.transpose(2, 3)) are copied first; out then still has x's strides where x is dense
(a second copy, on that path only), and is contiguous where x is not (x[:, ::2]).

Values. The op checks types, devices and shapes on every call and never reads a value on the
host (that would cost a device sync per call and could only be cached by tensor version, which
`.data`, numpy and storage writes do not bump: the stale-result bug of earlier releases). So
nothing is cached, and the arithmetic is plain IEEE fp32, the same on every backend, memory
layout and compile state, and in the reference (`fire_repair.repair_reference`, which defines it): NaN or
inf in directions/center/alpha reach the output as they would in `x - w @ V` summed over
*every* direction, so a direction whose weight is 0 still contributes 0 * inf = NaN where it
holds an inf or NaN (the C++ kernel skips a zero weight only where its score proves the
direction finite, which is exact); in invert, the share u = h / (1 + h), h = sum_k w_k slope_k
is likewise summed over every direction (0 * a NaN slope makes the row NaN, flagged or not),
and only a share of exactly 0 leaves the row as t = x - w @ V. A NaN in x makes its row's
scores NaN and, in project and clamp, the whole repaired row NaN (shift subtracts a constant,
so only the NaN elements stay NaN); an infinite
score gives the infinities and NaNs of that arithmetic (clamp leaves a row whose score is -inf
unrepaired). Finite inputs whose centred values x - mu or scores overflow fp32 (|.| > 3.4e38)
give inf like any fp32 computation; scores are computed centred (<v, x - mu>), so a large
common offset in x and mu costs no precision. The tensors' owners validate values where they
are set: `RepairModule` (at attach, `load_layer`, `load_state_dict`), `Profile.load`,
`LayerProfile`; `fire_repair.check_repairs(model)` re-checks an attached model on demand.
"""
import contextlib
import contextvars
import math
import os
from typing import Optional

import torch
from torch import Tensor

import fire_kernels
from fire_kernels import HAVE_TRITON, MAX_K
from fire_kernels.modes import MODES, SLOPE_MODES, TAU_MODES
from fire_kernels.repair import repair_rows

from . import _ext
from .reference import repair_rows_reference

MODE_IDS = {name: int(fire_kernels.Mode.parse(name)) for name in MODES}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "cuda", "cpu")


# ----------------------------------------------------------------------------- validation

def _channel_dim(x, channel_dim):
    """channel_dim as a dim of x in [1, x.dim()), or None for the flattened form."""
    if channel_dim is None:
        return None
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"fire.repair: channel_dim must be an int or None, got {channel_dim!r}")
    if x.dim() < 2 or not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"fire.repair: channel_dim={channel_dim} is not a feature dim of x {tuple(x.shape)}")
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("fire.repair: channel_dim cannot be the batch dim 0")
    return cd


def _validate(x, directions, alpha, center, tau, mode, channel_dim, slope=None):
    """Checks the public arguments' types, devices and shapes (exact and cheap: no values are
    read, so no device sync and nothing to cache); returns (mode_id, alpha fp32, tau fp32 or
    None, channel dim normalised, slope fp32 or None). Nothing is broadcast."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"fire.repair: mode must be one of {MODES}, got {mode!r}")
    for name, t in (("x", x), ("directions", directions), ("alpha", alpha), ("center", center), ("tau", tau),
                    ("slope", slope)):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"fire.repair: {name} must be a dense (strided) tensor, got layout {t.layout}; "
                            "sparse and other layouts are not supported (call .to_dense() first)")
    if x.dim() < 1:
        raise ValueError("fire.repair: x must be (N, ...) with a batch dimension, got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fire.repair: x must be float32, float16 or bfloat16, got {x.dtype}")
    cd = _channel_dim(x, channel_dim)
    for name, t in (("directions", directions), ("alpha", alpha), ("center", center), ("tau", tau),
                    ("slope", slope)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"fire.repair: {name} is on {t.device} but x is on {x.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fire.repair: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if cd is None:
        feat = tuple(x.shape[1:])
        D = math.prod(feat)
        if not (directions.dim() == 2 and directions.shape[1] == D) and tuple(directions.shape[1:]) != feat:
            raise ValueError(
                f"fire.repair: directions must be (K, {D}) or (K, *{feat}), got {tuple(directions.shape)}")
        center_shapes = ((D,), feat)
    else:
        C = x.shape[cd]
        if not (directions.dim() == 2 and directions.shape[1] == C):
            raise ValueError(
                f"fire.repair: per-position directions must be (K, C) = (K, {C}) for channel_dim={channel_dim}, "
                f"got {tuple(directions.shape)}")
        center_shapes = ((C,),)
    K = directions.shape[0]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"fire.repair: directions must hold 1 to {MAX_K} directions, got K={K}")
    if tuple(alpha.shape) != (K,):
        raise ValueError(f"fire.repair: alpha must be (K,) = ({K},), got {tuple(alpha.shape)}")
    if center is not None and tuple(center.shape) not in center_shapes:
        allowed = " or ".join(map(str, center_shapes))
        raise ValueError(f"fire.repair: center must be {allowed}, got {tuple(center.shape)}")
    if tau is not None:
        if mode not in TAU_MODES:
            raise ValueError(f"fire.repair: tau is only used by the modes {TAU_MODES}, got mode={mode!r}")
        if tuple(tau.shape) != (K,):
            raise ValueError(f"fire.repair: tau must be (K,) = ({K},), got {tuple(tau.shape)}")
    if slope is not None:
        if mode not in SLOPE_MODES:
            raise ValueError(f"fire.repair: slope is only used by the modes {SLOPE_MODES}, got mode={mode!r}")
        if tuple(slope.shape) != (K,):
            raise ValueError(f"fire.repair: slope must be (K,) = ({K},), got {tuple(slope.shape)}")
    f32 = torch.float32
    t = None if tau is None else tau.to(f32).contiguous()
    g = None if slope is None else slope.to(f32).contiguous()
    return MODE_IDS[mode], alpha.to(f32).contiguous(), t, cd, g


# ----------------------------------------------------------------------------- backends

def backend_for(device: torch.device) -> str:
    """'triton' or 'native' for tensors on `device`, per FIRE_BACKEND (auto|triton|cuda|cpu).
    csrc/repair_op.cpp (native_backend_selected) makes the same choice for eager calls."""
    choice = os.environ.get("FIRE_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"FIRE_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if device.type == "cuda":
        if choice == "cuda":
            return "native"
        if HAVE_TRITON:
            return "triton"
        if choice == "triton":
            raise RuntimeError("FIRE_BACKEND=triton but Triton is not installed")
        return "native"
    if device.type == "cpu":
        if choice == "triton":
            if os.environ.get("TRITON_INTERPRET") != "1" or not HAVE_TRITON:
                raise RuntimeError("FIRE_BACKEND=triton on CPU tensors needs Triton and TRITON_INTERPRET=1")
            return "triton"
        return "native"
    raise ValueError(f"fire.repair: x is on {device}; supported devices are cpu and cuda")


def _physical_perm(x: Tensor):
    """The order of x's feature dims in memory (outermost first), if each row is dense in it."""
    dims = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))  # stable: ties keep logical order
    expected = 1
    for d in reversed(dims):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return None
        expected *= x.shape[d]
    return dims


def _in_order(t: Tensor, lead: int, feat: list, perm: list) -> Tensor:
    """t as contiguous fp32 rows ((lead, D), or (D,) when lead is 0) whose columns follow the
    physical order `perm` of x's feature dims. No copy when t is already fp32 and laid out in
    that order (e.g. (K, C, H, W) directions in channels_last for channels_last x: what
    RepairModule keeps), a K*D copy otherwise."""
    D = math.prod(feat)
    u = t.reshape(([lead] if lead else []) + feat).to(torch.float32)
    if perm != sorted(perm):
        off = 1 if lead else 0
        u = u.permute(*range(off), *[p - 1 + off for p in perm])
    return u.reshape(([lead] if lead else []) + [D]).contiguous()


def _mergeable(t: Tensor, start: int, end: int) -> bool:
    """Whether dims [start, end) of t can be viewed as one dim (one stride), without a copy."""
    dims = [d for d in range(start, end) if t.shape[d] != 1]
    return all(t.stride(a) == t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:], strict=False))


def _flat_rows(x: Tensor):
    """x as (1, N, D) rows in physical order, and a function taking the kernel's output back to
    x's shape. Directions and centre must follow the returned permutation of x's feature dims."""
    N = x.shape[0]
    perm = _physical_perm(x)
    if perm is None:  # rows not dense in any order: the one case that copies x
        x = x.contiguous()
        perm = list(range(1, x.dim()))
    xp = x.permute(0, *perm) if perm != sorted(perm) else x
    x3 = xp.reshape(1, N, math.prod(x.shape[1:]))

    def restore(out3):
        out = out3.reshape(xp.shape)
        if xp is x:
            return out
        inverse = [0] * x.dim()
        for i, p in enumerate([0, *perm]):
            inverse[p] = i
        return out.permute(*inverse)

    return x3, perm, restore


def _position_rows(x: Tensor, cd: int):
    """x as (B, P, C) rows, one per sample and position, channels at any stride: (1, N*P, C)
    where sample and positions share one stride (channels_last, tokens), (N, P, C) where only
    the positions do (contiguous NCHW: channels at stride H*W). Returns the rows and a function
    taking the kernel's output back to x's shape."""
    xm = x.movedim(cd, -1)
    N, C = xm.shape[0], xm.shape[-1]
    P = math.prod(xm.shape[1:-1])
    if _mergeable(xm, 0, xm.dim() - 1):
        x3 = xm.reshape(1, N * P, C)
    elif _mergeable(xm, 1, xm.dim() - 1):
        x3 = xm.reshape(N, P, C)
    else:  # positions not addressable with one stride: copy once, and once more to give out x's strides
        x3 = xm.contiguous().reshape(1, N * P, C)
        return x3, lambda out3: torch.empty_like(x).copy_(out3.reshape(xm.shape).movedim(-1, cd))
    return x3, lambda out3: out3.reshape(xm.shape).movedim(-1, cd)


def _run(x, directions, alpha, center, tau, mode_id: int, want_scores: bool, cd=None, slope=None):
    """The repair of x (any layout). Flattened (cd None): `directions` (K, D) or (K, *feat) and
    `center` in logical order; per position (cd the channel dim): (K, C) and (C,). Any float
    dtype; alpha fp32 (K,) or (rows, K); slope fp32 (K,) or None. Returns out (x's shape and memory format) and scores
    ((N, K) or (N, *positions, K), fp32) or an empty tensor."""
    K = directions.shape[0]
    if cd is None:
        x3, perm, restore = _flat_rows(x)
        feat = list(x.shape[1:])
        V = _in_order(directions, K, feat, perm)
        center = None if center is None else _in_order(center, 0, feat, perm)
        lead = [x.shape[0]]
    else:
        x3, restore = _position_rows(x, cd)
        V = directions.to(torch.float32).contiguous()
        center = None if center is None else center.to(torch.float32).contiguous()
        lead = [s for d, s in enumerate(x.shape) if d != cd]
    if x.device.type == "meta":  # shapes only (e.g. a model built on the meta device)
        out3 = torch.empty_like(x3)
        scores = x.new_empty((x3.shape[0] * x3.shape[1], K) if want_scores else (0,), dtype=torch.float32)
    elif backend_for(x.device) == "triton":
        out3, scores = repair_rows(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    elif _inline_under_compile(x3, K):
        out3, scores = _inline_rows(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    else:
        _ext.require_native()
        out3, scores = torch.ops.fire._repair_native(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    if want_scores:
        scores = scores.reshape(*lead, K)
    return restore(out3), scores


# Under torch.compile on the CPU, a call of the C++ kernel from Inductor's Python wrapper costs
# about 5-10 us more than Inductor's own C++ for the same maths on a small input (which can also
# fuse with its neighbours). So calls whose elements x directions are at most this many compile
# to the plain maths; larger ones keep the fused kernel (up to 4x faster than Inductor's code
# there). Measured on a 2-core Zen 3, side by side (benchmarks/README.md, "Under torch.compile"):
# inline wins by up to 14% at 512 x K 1-16, ties at 16384 x K 1, and loses from 2048 x K 16 on.
# The choice is made at trace time, from static sizes; a symbolic size keeps the kernel.
COMPILE_INLINE_WORK = 16384
# Set by `plain_maths()`: every traced CPU call becomes plain maths, whatever its size, so that
# an exported package needs no C++ extension of ours where it is loaded (fire_repair.export).
_plain_maths = contextvars.ContextVar("fire_plain_maths", default=False)


@contextlib.contextmanager
def plain_maths():
    """Inside the block, CPU calls become plain PyTorch maths instead of calls of the C++ kernel,
    so that what torch.export and AOTInductor trace is maths Inductor compiles and fuses itself."""
    token = _plain_maths.set(True)
    try:
        yield
    finally:
        _plain_maths.reset(token)


def _inline_under_compile(x3: Tensor, K: int) -> bool:
    """Whether this call of the C++ kernel, traced by torch.compile (or export), becomes plain maths."""
    if x3.device.type != "cpu":
        return False
    if _plain_maths.get():  # Inductor traces a triton_op's body outside is_compiling()
        return True
    if not torch.compiler.is_compiling():
        return False
    n = x3.numel()
    return isinstance(n, int) and n * K <= COMPILE_INLINE_WORK


def _inline_rows(x3, V, alpha, center, tau, mode_id: int, want_scores: bool, slope=None):
    """The kernel's contract in plain PyTorch (fp32 maths, out in x3's dtype and layout)."""
    D = x3.shape[-1]
    out, c = repair_rows_reference(x3.reshape(-1, D).float(), V, alpha, center, tau, MODES[mode_id], slope)
    out3 = torch.empty_like(x3)
    out3.copy_(out.reshape(x3.shape))
    return out3, (c if want_scores else c.new_empty(0))


# ----------------------------------------------------------------------------- the ops

def _define(name: str):
    """A triton_op where Triton exists; otherwise a custom_op whose fake is the same body."""

    def deco(fn):
        if HAVE_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return deco


def _repair(
    x: Tensor,
    directions: Tensor,
    alpha: Tensor,
    center: Optional[Tensor] = None,
    tau: Optional[Tensor] = None,
    mode: str = "project",
    channel_dim: Optional[int] = None,
    slope: Optional[Tensor] = None,
) -> Tensor:
    mode_id, a, t, cd, g = _validate(x, directions, alpha, center, tau, mode, channel_dim, slope)
    return _run(x, directions, a, center, t, mode_id, False, cd, g)[0]


def _repair_with_scores(
    x: Tensor,
    directions: Tensor,
    alpha: Tensor,
    center: Optional[Tensor] = None,
    tau: Optional[Tensor] = None,
    mode: str = "project",
    channel_dim: Optional[int] = None,
    slope: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    mode_id, a, t, cd, g = _validate(x, directions, alpha, center, tau, mode, channel_dim, slope)
    out, scores = _run(x, directions, a, center, t, mode_id, True, cd, g)
    return out, scores


repair = _define("fire::repair")(_repair)
repair_with_scores = _define("fire::repair_with_scores")(_repair_with_scores)
# Twins under private names: where the C++ extension is loaded, eager CPU calls of the two ops
# run in C++ (csrc/repair_op.cpp) and defer to these for what the C++ path does not take
# (gradients, FIRE_BACKEND=triton, inputs to copy or to refuse with a named error).
_repair_py = _define("fire::_repair_py")(_repair)
_repair_with_scores_py = _define("fire::_repair_with_scores_py")(_repair_with_scores)


@_define("fire::_repair_grad")
def _repair_grad(
    grad: Tensor, directions: Tensor, weights: Tensor, channel_dim: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """grad - sum_k weights[r, k] <grad_r, v_k> v_k, and <grad_r, v_k>, per row r, in one pass
    (backward). Rows as in the forward op: per sample, or per sample and position."""
    cd = _channel_dim(grad, channel_dim)
    out, p = _run(grad, directions, weights, None, None, fire_kernels.PROJECT, True, cd)
    return out, p


# Where Triton is missing, the C++ op takes eager CUDA calls itself (builds with CUDA).
_ext.set_triton_serves_cuda(HAVE_TRITON)

if _ext.AVAILABLE:

    @torch.library.register_fake("fire::_repair_native")
    def _repair_native_fake(x, directions, alpha, center, tau, mode, want_scores, slope=None):
        rows, K = x.shape[0] * x.shape[1], directions.shape[0]
        out = torch.empty_like(x)
        scores = x.new_empty((rows, K) if want_scores else (0,), dtype=torch.float32)
        return out, scores


# ----------------------------------------------------------------------------- autograd
#
# With w_nk = alpha_k g'(c_nk), G_nk = g(c_nk) (g = 1, c, relu(c - tau) or [c > tau] by mode) and
# P = grad_out V^T (gated: g' = 0 almost everywhere, so x, mu and tau get no gradient through it):
#   dx     = grad_out - sum_k w_nk P_nk v_k            (fused: fire::_repair_grad)
#   dV     = -(alpha * G)^T grad_out - (w * P)^T (x - mu)
#   dalpha = -sum_n G * P,   dmu = sum_n (w * P) V,   dtau = sum_n (w * P)   (clamp)
# plus, for repair_with_scores, the scores' own gradient (c = V (x - mu)).
# Invert (w = alpha [c > tau], h = w g, s = 1 / (1 + h), t = x - w V, y = s t + (1 - s) mu):
#   dx = s grad_out,  dV = -(s w)^T grad_out,  dmu = sum_n (1 - s) grad_out,
#   dalpha_k = sum_n [c_k > tau_k] (-s P_k + s^2 g_k <grad_out, mu - t>),
#   dslope_k = sum_n s^2 w_k <grad_out, mu - t>.

def _setup(ctx, inputs, output):
    x, directions, alpha, center, tau, mode, *rest = inputs
    scores = output[1] if isinstance(output, tuple) else None
    ctx.mode = mode
    ctx.channel_dim = rest[0] if rest else None
    slope = rest[1] if len(rest) > 1 else None
    ctx.has_center, ctx.has_tau = center is not None, tau is not None
    ctx.save_for_backward(x, directions, alpha, center, tau, scores, slope)


def _rows(t: Tensor, cd) -> Tensor:
    """t as the op's rows: (N, D) flattened (cd None), (N * positions, C) per position."""
    if cd is None:
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))
    m = t.movedim(cd, -1)
    return m.reshape(math.prod(m.shape[:-1]), m.shape[-1])


def _unrows(r: Tensor, shape, cd) -> Tensor:
    """Rows back to a tensor of `shape` (the inverse of `_rows`)."""
    if cd is None:
        return r.reshape(shape)
    moved = list(shape)
    moved.append(moved.pop(cd))
    return r.reshape(moved).movedim(-1, cd)


def _backward(ctx, grad_out, grad_scores=None):
    x, directions, alpha, center, tau, c, slope = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)  # trailing defaulted arguments may be absent
    need_x, need_v, need_a, need_mu, need_tau = (list(ctx.needs_input_grad) + [False] * 5)[:5]
    mode, cd = ctx.mode, _channel_dim(x, ctx.channel_dim)
    if mode == "invert" and slope is not None:
        return _invert_backward(ctx, grad_out, grad_scores, n_inputs)
    mode = "gated" if mode == "invert" else mode  # without a slope, invert is gated
    K = directions.shape[0]

    # Everything below works on rows: (N, D) flattened, or (N * positions, C) per position.
    xc, V = _centred_rows(x, directions, center, cd)
    R, D = xc.shape
    a = alpha.float()
    if c is None and mode != "shift":
        c = xc @ V.T
    c = None if c is None else c.reshape(R, K)
    if mode == "shift":
        G, w = torch.ones(R, K, dtype=torch.float32, device=x.device), None
    elif mode == "project":
        G, w = c, a.expand(R, K)
    else:
        t = tau.float() if tau is not None else torch.zeros_like(a)
        active = (c > t).float()
        if mode == "clamp":
            G, w = torch.clamp(c - t, min=0), a * active
        else:  # gated: a piecewise-constant weight, out = x - const where it does not switch
            G, w = active, None

    g2 = _rows(grad_out, cd).float()
    if w is None:  # shift, gated: out = x - const (per row)
        dx = grad_out
        P = g2 @ V.T if need_a else None
    else:
        dx, P = _repair_grad(grad_out, V, w.contiguous(), cd)
        P = P.reshape(R, K)
    gs = None
    if grad_scores is not None:
        gs = grad_scores.float().reshape(R, K)
        dx = dx + _unrows(gs @ V, x.shape, cd).to(dx.dtype)

    dV = da = dmu = dtau = None
    if need_v:
        if mode == "shift":
            dV = -(a[:, None] * g2.sum(0)[None, :])
        elif w is None:  # gated
            dV = -(a * G).T @ g2
        else:
            dV = -(a * G).T @ g2 - (w * P).T @ xc
        if gs is not None:
            dV = dV + gs.T @ xc
        dV = dV.reshape(directions.shape).to(directions.dtype)
    if need_a:
        da = (-(G * P).sum(0)).to(alpha.dtype)
    if need_mu:
        dmu = torch.zeros(D, device=x.device) if w is None else (w * P).sum(0) @ V
        if gs is not None:
            dmu = dmu - gs.sum(0) @ V
        dmu = dmu.reshape(center.shape).to(center.dtype)
    if need_tau:
        dtau = (torch.zeros(K, device=x.device) if w is None else (w * P).sum(0)).to(tau.dtype)
    return (dx, dV, da, dmu, dtau, None, None, None)[:n_inputs]


def _centred_rows(x, directions, center, cd):
    """x - center as fp32 rows (R, D), and the directions as fp32 (K, D): what backward works on."""
    xc = _rows(x, cd).float()
    V = directions.reshape(directions.shape[0], xc.shape[1]).float()
    if center is not None:
        xc = xc - center.reshape(1, -1).float()
    return xc, V


def _invert_backward(ctx, grad_out, grad_scores, n_inputs):
    """The gradients of mode invert with a slope (formulas above), in plain PyTorch on rows."""
    x, directions, alpha, center, tau, c, slope = ctx.saved_tensors
    cd = _channel_dim(x, ctx.channel_dim)
    K = directions.shape[0]
    xc, V = _centred_rows(x, directions, center, cd)
    R = xc.shape[0]
    c = (xc @ V.T if c is None else c.reshape(R, K)).float()
    t = tau.float() if tau is not None else torch.zeros(K, device=x.device)
    gate = torch.where(c.isnan(), c, (c > t).float())
    w = alpha.float() * gate
    s = 1 / (1 + w @ slope.float())  # (R,)
    g2 = _rows(grad_out, cd).float()
    dx = _unrows(s[:, None] * g2, x.shape, cd).to(grad_out.dtype)
    if grad_scores is not None:
        dx = dx + _unrows(grad_scores.float().reshape(R, K) @ V, x.shape, cd).to(dx.dtype)
    need = list(ctx.needs_input_grad) + [False] * 8
    dV = da = dmu = dg = None
    if need[1]:
        dV = -(s[:, None] * w).T @ g2
        if grad_scores is not None:
            dV = dV + grad_scores.float().reshape(R, K).T @ xc
        dV = dV.reshape(directions.shape).to(directions.dtype)
    if need[2] or need[7]:
        to_mu = (g2 * (w @ V - xc)).sum(1)  # <grad_out, mu - t> per row
        if need[2]:
            P = g2 @ V.T
            da = (gate * (-s[:, None] * P + (s**2)[:, None] * slope.float() * to_mu[:, None])).sum(0)
            da = da.to(alpha.dtype)
        if need[7]:
            dg = ((s**2)[:, None] * w * to_mu[:, None]).sum(0).to(slope.dtype)
    if need[3]:
        dmu = ((1 - s) @ g2)
        if grad_scores is not None:
            dmu = dmu - grad_scores.float().reshape(R, K).sum(0) @ V
        dmu = dmu.reshape(center.shape).to(center.dtype)
    dtau = torch.zeros_like(tau) if need[4] else None
    return (dx, dV, da, dmu, dtau, None, None, dg)[:n_inputs]


# Second derivatives (e.g. a gradient penalty on the input): `_repair_grad` is linear in grad,
# out_r = (I - sum_k w_rk v_k v_k^T) grad_r and p_rk = <grad_r, v_k>. The matrix is symmetric,
# so its vector-Jacobian product is the same fused pass; p contributes sum_k gp_rk v_k. The
# weights depend on alpha (and on x only through clamp's piecewise-constant active set), so
# x's second derivative needs nothing else; derivatives through directions or weights are not
# implemented and say so.

def _grad_setup(ctx, inputs, output):
    grad, directions, weights, *rest = inputs
    ctx.channel_dim = rest[0] if rest else None
    ctx.grad_shape = grad.shape
    ctx.save_for_backward(directions, weights)


def _grad_backward(ctx, g_out, g_p):
    directions, weights = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)
    if any(ctx.needs_input_grad[1:3]):
        raise NotImplementedError(
            "fire.repair: second derivatives are implemented with respect to x only; a double backward "
            "through the directions, alpha, center or tau (create_graph=True with those requiring grad) is not")
    dgrad = None
    if ctx.needs_input_grad[0]:
        cd = ctx.channel_dim
        dgrad = _repair_grad(g_out, directions, weights, cd)[0]
        if g_p is not None:
            K = directions.shape[0]
            back = g_p.reshape(-1, K).float() @ directions.reshape(K, -1).float()
            dgrad = dgrad + _unrows(back, ctx.grad_shape, cd).to(dgrad.dtype)
    return (dgrad, None, None, None)[:n_inputs]


for _op in (repair, repair_with_scores, _repair_py, _repair_with_scores_py):
    _op.register_autograd(_backward, setup_context=_setup)
_repair_grad.register_autograd(_grad_backward, setup_context=_grad_setup)
