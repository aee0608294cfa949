"""x as the kernels' rows, without a copy where x's layout allows, and the kernels' output back
to x's shape and memory format.

- Flattened: one row per sample, D = all features, in x's *physical* order, so a channels_last
  (or any permuted dense) input is never copied; the directions and centre are permuted
  instead (K*D + D elements).
- Per position: the channels at one position form a row, at any element stride, so contiguous
  NCHW (channels at stride H*W), channels_last and (N, T, C) tokens are all read in place.
Only inputs whose rows cannot be addressed with one stride per level (x[:, ::2] flattened, or per
position a map whose positions are permuted, x.transpose(2, 3)) are copied first.
"""
import math

import torch
from torch import Tensor


def physical_perm(x: Tensor):
    """The order of x's feature dims in memory (outermost first), if each row is dense in it."""
    dims = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))  # stable: ties keep logical order
    expected = 1
    for d in reversed(dims):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return None
        expected *= x.shape[d]
    return dims


def in_order(t: Tensor, lead: int, feat: list, perm: list) -> Tensor:
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


def mergeable(t: Tensor, start: int, end: int) -> bool:
    """Whether dims [start, end) of t can be viewed as one dim (one stride), without a copy."""
    dims = [d for d in range(start, end) if t.shape[d] != 1]
    return all(t.stride(a) == t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:], strict=False))


def flat_rows(x: Tensor):
    """x as (1, N, D) rows in physical order, the permutation of x's feature dims that the
    directions and centre must follow, and a function taking the kernel's output back to x's shape."""
    N = x.shape[0]
    perm = physical_perm(x)
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


def position_rows(x: Tensor, cd: int):
    """x as (B, P, C) rows, one per sample and position, channels at any stride: (1, N*P, C)
    where sample and positions share one stride (channels_last, tokens), (N, P, C) where only
    the positions do (contiguous NCHW: channels at stride H*W). Returns the rows and a function
    taking the kernel's output back to x's shape (and x's strides where x is dense)."""
    xm = x.movedim(cd, -1)
    N, C = xm.shape[0], xm.shape[-1]
    P = math.prod(xm.shape[1:-1])
    if mergeable(xm, 0, xm.dim() - 1):
        x3 = xm.reshape(1, N * P, C)
    elif mergeable(xm, 1, xm.dim() - 1):
        x3 = xm.reshape(N, P, C)
    else:  # positions not addressable with one stride: copy once, and once more to give out x's strides
        x3 = xm.contiguous().reshape(1, N * P, C)
        return x3, lambda out3: torch.empty_like(x).copy_(out3.reshape(xm.shape).movedim(-1, cd))
    return x3, lambda out3: out3.reshape(xm.shape).movedim(-1, cd)


def rows(t: Tensor, cd) -> Tensor:
    """t as the op's rows in logical order: (N, D) flattened (cd None), (N * positions, C) per
    position (what the backward formulas work on)."""
    if cd is None:
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))
    m = t.movedim(cd, -1)
    return m.reshape(math.prod(m.shape[:-1]), m.shape[-1])


def unrows(r: Tensor, shape, cd) -> Tensor:
    """Rows back to a tensor of `shape` (the inverse of `rows`)."""
    if cd is None:
        return r.reshape(shape)
    moved = list(shape)
    moved.append(moved.pop(cd))
    return r.reshape(moved).movedim(-1, cd)
