"""The ops' body: x laid out as rows, then one kernel call, chosen by the device (meta: shapes
only), the backend decision (`backend.backend_for`) and, under torch.compile, the inlining rule
(`inline`). The same body is the fake (meta) implementation, and what torch.compile traces."""
import torch

from fire_kernels.repair import repair_rows

from .. import _ext
from .backend import backend_for
from .inline import inline_rows, inline_under_compile
from .layout import flat_rows, in_order, position_rows


def run(x, directions, alpha, center, tau, mode_id: int, want_scores: bool, cd=None, slope=None):
    """The repair of x (any layout). Flattened (cd None): `directions` (K, D) or (K, *feat) and
    `center` in logical order; per position (cd the channel dim): (K, C) and (C,). Any float
    dtype; alpha fp32 (K,) or (rows, K); slope fp32 (K,) or None. Returns out (x's shape and
    memory format) and scores ((N, K) or (N, *positions, K), fp32) or an empty tensor."""
    K = directions.shape[0]
    if cd is None:
        x3, perm, restore = flat_rows(x)
        feat = list(x.shape[1:])
        V = in_order(directions, K, feat, perm)
        center = None if center is None else in_order(center, 0, feat, perm)
        lead = [x.shape[0]]
    else:
        x3, restore = position_rows(x, cd)
        V = directions.to(torch.float32).contiguous()
        center = None if center is None else center.to(torch.float32).contiguous()
        lead = [s for d, s in enumerate(x.shape) if d != cd]
    out3, scores = _rows_kernel(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    if want_scores:
        scores = scores.reshape(*lead, K)
    return restore(out3), scores


def _rows_kernel(x3, V, alpha, center, tau, mode_id, want_scores, slope):
    """The kernel that serves these rows: (B, P, D) in, out like x3 and (B*P, K) scores."""
    if x3.device.type == "meta":  # shapes only (e.g. a model built on the meta device)
        K = V.shape[0]
        scores = x3.new_empty((x3.shape[0] * x3.shape[1], K) if want_scores else (0,), dtype=torch.float32)
        return torch.empty_like(x3), scores
    if backend_for(x3.device) == "triton":
        return repair_rows(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    if inline_under_compile(x3, V.shape[0]):
        return inline_rows(x3, V, alpha, center, tau, mode_id, want_scores, slope)
    _ext.require_native()
    return torch.ops.fire._repair_native(x3, V, alpha, center, tau, mode_id, want_scores, slope)
