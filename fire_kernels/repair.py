"""Fused repair kernels.

Per row x (D elements: a flattened sample, or the channels at one position of a feature map
or token tensor), with V (K x D), per-row weights alpha, centre mu and thresholds tau:

    c_k   = <v_k, x - mu>                          (the projection scores)
    w_k   = alpha_k            (shift)
          = alpha_k * c_k      (project)
          = alpha_k * max(c_k - tau_k, 0)  (clamp)
          = alpha_k * [c_k > tau_k]         (gated, invert)
    out   = x - sum_k w_k v_k
    invert, with slope g: out = (1 - u)(x - sum_k w_k v_k) + u mu, u = h / (1 + h), h = sum_k w_k g_k

Two kernels cover all row lengths:
- `_repair_fused_kernel`: a program owns a block of whole rows (D <= FUSED_MAX_D, half in invert), reads each
  row once, keeps it in registers while the K scores are reduced, and writes it once.
- `_block_scores_kernel` + `_block_apply_kernel`: longer rows are split in spans, and a
  program owns one span of a block of rows, walked in D-chunks, so each direction chunk is read
  once per row block (not once per row) and the K projections are `tl.dot` products. The first
  launch writes per-span partial scores, the second sums them (in a fixed order, so results
  are deterministic), weighs the directions and writes its span (`y = x - W @ V`, `tl.dot`
  again). x is read twice; no host round trip in between.

Rows are addressed as (b, p) with any strides, elements of a row at any stride: the flattened
form is one row per sample; the per-position form puts the channels of each position in a row,
so a contiguous NCHW map is read as (channel x position-block) tiles, coalesced along
positions, with no transposing copy.

All arithmetic is fp32: loads are upcast at once (the Triton interpreter also computes bf16
wrongly otherwise).
"""
import os

import torch
from torch.library import wrap_triton

from .blocks import MAX_K, fused_blocks, fused_max_d, next_pow2, row_block_blocks

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU and CUDA C++ kernels still work
    triton = None
    HAVE_TRITON = False

from .modes import Mode  # noqa: E402

SHIFT, PROJECT, CLAMP, GATED = int(Mode.SHIFT), int(Mode.PROJECT), int(Mode.CLAMP), int(Mode.GATED)
INVERT = int(Mode.INVERT)

if HAVE_TRITON:

    @triton.jit
    def _weights(c_k, alpha_k, tau_k, MODE: tl.constexpr):
        # NaN semantics follow the reference: a NaN score gives a NaN weight in project and
        # clamp (tl.maximum would drop it: the comparison below keeps it), never in shift,
        # whose weight does not depend on the score (no arithmetic on c_k, only its shape).
        if MODE == 0:  # Mode.SHIFT (Triton compares constexprs with literals)
            w = tl.where(c_k == c_k, alpha_k, alpha_k)
        elif MODE == 1:  # Mode.PROJECT
            w = alpha_k * c_k
        elif MODE == 2:  # Mode.CLAMP
            excess = c_k - tau_k
            w = alpha_k * tl.where(excess < 0.0, 0.0, excess)
        else:  # Mode.GATED and Mode.INVERT: a step, NaN where the score is NaN
            excess = c_k - tau_k
            w = alpha_k * tl.where(excess > 0.0, 1.0, tl.where(excess <= 0.0, 0.0, excess))
        return w

    @triton.jit
    def _toward_center(y, u, mu):
        # invert: the flagged rows' share u = h / (1 + h) of the centre; u = 0 leaves y exactly
        return tl.where(u[:, None] == 0.0, y, y + u[:, None] * (mu - y))

    @triton.jit
    def _repair_fused_kernel(
        x_ptr, out_ptr, v_ptr, alpha_ptr, center_ptr, tau_ptr, scores_ptr, slope_ptr,
        P, D, K, sxb, sxp, sxd, sob, sop, sod, stride_an,
        MODE: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_TAU: tl.constexpr, HAS_SLOPE: tl.constexpr,
        NEED_C: tl.constexpr, WANT_SCORES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # A (BLOCK_N rows x BLOCK_D columns) tile of x[b]: rows are positions p, columns the
        # D elements of a row, at any strides (sxd = H*W for channels of a contiguous NCHW map).
        pblk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pos = pblk * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        kidx = tl.arange(0, BLOCK_K)
        rmask = pos < P
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        pos64 = pos.to(tl.int64)
        cols64 = cols.to(tl.int64)
        rows64 = b * P + pos64  # row index into scores and per-row alpha
        x = tl.load(x_ptr + b * sxb + pos64[:, None] * sxp + cols64[None, :] * sxd, mask=mask, other=0.0)
        x = x.to(tl.float32)

        c = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if NEED_C:
            xc = x
            if HAS_CENTER:
                mu = tl.load(center_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mu[None, :], 0.0)
            for k in range(K):
                v = tl.load(v_ptr + k * D + cols, mask=cmask, other=0.0).to(tl.float32)
                c_k = tl.sum(xc * v[None, :], axis=1)
                c = tl.where(kidx[None, :] == k, c_k[:, None], c)
            if WANT_SCORES:
                smask = rmask[:, None] & (kidx[None, :] < K)
                tl.store(scores_ptr + rows64[:, None] * K + kidx[None, :], c, mask=smask)

        y = x
        h = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(K):
            v = tl.load(v_ptr + k * D + cols, mask=cmask, other=0.0).to(tl.float32)
            a = tl.load(alpha_ptr + rows64 * stride_an + k, mask=rmask, other=0.0).to(tl.float32)
            c_k = tl.sum(tl.where(kidx[None, :] == k, c, 0.0), axis=1)
            t = 0.0
            if HAS_TAU:
                t = tl.load(tau_ptr + k).to(tl.float32)
            w = _weights(c_k, a, t, MODE)
            y = y - w[:, None] * v[None, :]
            if HAS_SLOPE:
                h += w * tl.load(slope_ptr + k).to(tl.float32)
        if HAS_SLOPE:  # the centre loaded again: kept from the scores, it would stay live over the loop
            mu = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_CENTER:
                mu = tl.load(center_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            y = _toward_center(y, h / (1.0 + h), mu[None, :])
        o_offs = b * sob + pos64[:, None] * sop + cols64[None, :] * sod
        tl.store(out_ptr + o_offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _block_scores_kernel(
        x_ptr, v_ptr, center_ptr, partial_ptr,
        R, P, D, K, sxb, sxp, sxd, n_spans,
        HAS_CENTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        SPAN: tl.constexpr,
    ):
        # One SPAN of columns of BLOCK_N rows, in BLOCK_D chunks: each direction chunk is loaded
        # once for all the rows, and the K partial scores of every row come from
        # (rows x chunk) @ (chunk x K) products.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        span = tl.program_id(1)
        kidx = tl.arange(0, BLOCK_K)
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        base = (rows64 // P) * sxb + (rows64 % P) * sxp
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, SPAN, BLOCK_D):
            cols = span * SPAN + d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            x = tl.load(x_ptr + base[:, None] + cols.to(tl.int64)[None, :] * sxd,
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if HAS_CENTER:
                x = x - tl.load(center_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            v = tl.load(v_ptr + kidx[:, None] * D + cols[None, :], mask=(kidx < K)[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            part += tl.dot(x, tl.trans(v), input_precision="ieee")  # fp32 products: no TF32 rounding
        tl.store(partial_ptr + (rows64[:, None] * n_spans + span) * BLOCK_K + kidx[None, :], part,
                 mask=rmask[:, None])

    @triton.jit
    def _block_apply_kernel(
        x_ptr, out_ptr, v_ptr, alpha_ptr, tau_ptr, partial_ptr, scores_ptr, center_ptr, slope_ptr,
        R, P, D, K, sxb, sxp, sxd, sob, sop, sod, stride_an, n_spans,
        MODE: tl.constexpr, HAS_TAU: tl.constexpr, NEED_C: tl.constexpr, WANT_SCORES: tl.constexpr,
        HAS_CENTER: tl.constexpr, HAS_SLOPE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        span = tl.program_id(1)
        kidx = tl.arange(0, BLOCK_K)
        rmask = rows < R
        kmask = kidx < K
        rows64 = rows.to(tl.int64)
        c = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if NEED_C:
            # every program of a row block sums the same partials in the same order: deterministic
            for j in range(n_spans):
                c += tl.load(partial_ptr + (rows64[:, None] * n_spans + j) * BLOCK_K + kidx[None, :],
                             mask=rmask[:, None], other=0.0)
            if WANT_SCORES:
                if span == 0:
                    tl.store(scores_ptr + rows64[:, None] * K + kidx[None, :], c, mask=rmask[:, None] & kmask[None, :])
        a = tl.load(alpha_ptr + rows64[:, None] * stride_an + kidx[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        t = 0.0
        if HAS_TAU:
            t = tl.load(tau_ptr + kidx, mask=kmask, other=0.0).to(tl.float32)[None, :]
        w = tl.where(kmask[None, :], _weights(c, a, t, MODE), 0.0)  # padded directions move nothing
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_SLOPE:
            h = tl.sum(w * tl.load(slope_ptr + kidx, mask=kmask, other=0.0).to(tl.float32)[None, :], axis=1)
            u = h / (1.0 + h)
        xrow = (rows64 // P) * sxb + (rows64 % P) * sxp
        orow = (rows64 // P) * sob + (rows64 % P) * sop
        for d0 in range(0, SPAN, BLOCK_D):
            cols = span * SPAN + d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            cols64 = cols.to(tl.int64)
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + xrow[:, None] + cols64[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kidx[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            y = x - tl.dot(w, v, input_precision="ieee")
            if HAS_SLOPE:
                mu = tl.zeros((BLOCK_D,), dtype=tl.float32)
                if HAS_CENTER:
                    mu = tl.load(center_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                y = _toward_center(y, u, mu[None, :])
            tl.store(out_ptr + orow[:, None] + cols64[None, :] * sod, y.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def repair_rows(x, directions, alpha, center, tau, mode: int, want_scores: bool, slope=None):
    """Launch the repair on prepared rows.

    x: (B, P, D), any strides: row (b, p) holds D elements at stride x.stride(2) (1 for
    flattened samples and channels-last positions, H*W for the channels of a contiguous NCHW
    map); directions: (K, D) fp32 contiguous; alpha: (K,) or (B*P, K) fp32 contiguous; center:
    (D,) fp32 or None; tau: (K,) fp32 or None; slope: (K,) fp32 or None (mode invert only).
    Returns out (`empty_like(x)`: x's strides where x is dense) in x's dtype and scores
    (B*P, K) fp32 (empty if not wanted).
    Safe inside `torch.library.triton_op`: every launch is a plain `wrap_triton(kernel)[grid]`
    call, the form torch's kernel discovery for triton_op recognises.
    """
    if not HAVE_TRITON:
        raise RuntimeError("fire_kernels: Triton is not installed; use the C++/CUDA backend instead")
    B, P, D = x.shape
    K = directions.shape[0]
    if K > MAX_K:
        raise ValueError(f"fire_kernels: at most {MAX_K} directions per call, got K={K}")
    out = torch.empty_like(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    scores = torch.empty((B * P, K), **f32) if want_scores else torch.empty((0,), **f32)
    if B * P == 0 or D == 0:
        if want_scores:
            scores.zero_()  # an empty row projects to zero
        return out, scores
    need_c = mode != SHIFT or want_scores
    block_k = next_pow2(K)
    stride_an = K if alpha.dim() == 2 else 0
    center_arg = center if center is not None else directions  # never read when absent
    tau_arg = tau if tau is not None else alpha
    has_slope = slope is not None and mode == INVERT
    slope_arg = slope if has_slope else alpha
    # dummies are never read (constexpr flags); the unused scores pointer is `out`, a fresh buffer, so
    # that no input can look mutated to torch.compile's analysis of the kernel
    scores_arg = scores if want_scores else out
    xs, os_ = x.stride(), out.stride()
    if D <= fused_max_d(has_slope):
        block_n, block_d, warps = fused_blocks(D, has_slope)
        grid = (triton.cdiv(P, block_n), B)
        wrap_triton(_repair_fused_kernel)[grid](
            x, out, directions, alpha, center_arg, tau_arg, scores_arg, slope_arg,
            P, D, K, xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], stride_an,
            MODE=mode, HAS_CENTER=center is not None, HAS_TAU=tau is not None, HAS_SLOPE=has_slope,
            NEED_C=need_c, WANT_SCORES=want_scores,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps,
        )
        return out, scores
    block_n, block_d, block_k, span, n_spans, warps = row_block_blocks(D, K, _interpreted(), has_slope)
    grid = (triton.cdiv(B * P, block_n), n_spans)
    blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, SPAN=span, num_warps=warps)
    partial = torch.empty((B * P, n_spans, block_k), **f32) if need_c else torch.empty((1,), **f32)
    if need_c:
        wrap_triton(_block_scores_kernel)[grid](
            x, directions, center_arg, partial, B * P, P, D, K, xs[0], xs[1], xs[2], n_spans,
            HAS_CENTER=center is not None, **blocks,
        )
    wrap_triton(_block_apply_kernel)[grid](
        x, out, directions, alpha, tau_arg, partial, scores_arg, center_arg, slope_arg,
        B * P, P, D, K, xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], stride_an, n_spans,
        MODE=mode, HAS_TAU=tau is not None, NEED_C=need_c, WANT_SCORES=want_scores,
        HAS_CENTER=center is not None, HAS_SLOPE=has_slope, **blocks,
    )
    return out, scores
