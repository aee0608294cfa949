"""Plain PyTorch statement of the repair maths: the reference the kernels are tested against,
and the 'eager PyTorch' baseline of the benchmarks (what a user would write without us)."""
import math

import torch

from fire_kernels.modes import MODES


def repair_reference(x, directions, alpha, center=None, tau=None, mode="project", channel_dim=None,
                     compute_dtype=torch.float64, slope=None):
    """Returns (out, scores) computed in `compute_dtype`; out is cast back to x's dtype.

    channel_dim None: one row per sample (D = all features), scores (N, K). channel_dim an int:
    one row per sample and position (D = x.shape[channel_dim]), the same directions at every
    position, scores (N, *positions, K)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    K = directions.shape[0]
    if channel_dim is None:
        xm = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    else:
        xm = x.movedim(channel_dim, -1)
    lead, D = xm.shape[:-1], xm.shape[-1]
    xr = xm.reshape(math.prod(lead), D).to(compute_dtype)
    V = directions.reshape(K, D).to(compute_dtype)
    a = alpha.to(compute_dtype)
    mu = None if center is None else center.reshape(-1).to(compute_dtype)
    t = None if tau is None else tau.to(compute_dtype)
    g = None if slope is None else slope.to(compute_dtype)
    out, c = repair_rows_reference(xr, V, a, mu, t, mode, g)
    out = out.to(x.dtype).reshape(xm.shape)
    out = out.reshape(x.shape) if channel_dim is None else out.movedim(-1, channel_dim)
    return out, c.float().reshape(*lead, K)


def repair_rows_reference(xr, V, alpha, center=None, tau=None, mode="project", slope=None):
    """The maths on rows, in the rows' dtype: xr (R, D), V (K, D), alpha (K,) or (R, K), center
    (D,), tau (K,), slope (K,) (invert), all of one dtype. Returns (out (R, D), scores (R, K)). Also what the op
    compiles to for small inputs under torch.compile on the CPU (fire_repair/_op/inline.py)."""
    xc = xr if center is None else xr - center
    c = xc @ V.T
    if mode == "shift":
        w = alpha.expand(xr.shape[0], V.shape[0])
    elif mode == "project":
        w = alpha * c
    else:
        excess = c if tau is None else c - tau
        if mode == "clamp":
            w = alpha * torch.clamp(excess, min=0)
        else:  # gated, invert: a step (NaN where the score is NaN)
            w = alpha * torch.where(excess.isnan(), excess, (excess > 0).to(excess.dtype))
    out = xr - w @ V
    if mode == "invert" and slope is not None:  # the flagged rows rescaled about the centre
        h = w @ slope
        u = h / (1 + h)
        mu = torch.zeros_like(out[:1]) if center is None else center
        out = torch.where(u[:, None] == 0, out, out + u[:, None] * (mu - out))  # u = 0: exactly t
    return out, c
