"""The public arguments' checks: types, devices and shapes, exact and cheap (no values are read,
so no device sync and nothing to cache). Bad input raises a ValueError or TypeError that names
the argument; nothing is broadcast."""
import math

import torch

import fire_kernels
from fire_kernels import MAX_K
from fire_kernels.modes import MODES, SLOPE_MODES, TAU_MODES

MODE_IDS = {name: int(fire_kernels.Mode.parse(name)) for name in MODES}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PARAMETERS = ("directions", "alpha", "center", "tau", "slope")


def channel_dim_of(x, channel_dim):
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


def validate(x, directions, alpha, center, tau, mode, channel_dim, slope=None):
    """Checks the public arguments; returns (mode_id, alpha fp32, tau fp32 or None, channel dim
    normalised, slope fp32 or None)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"fire.repair: mode must be one of {MODES}, got {mode!r}")
    params = dict(zip(PARAMETERS, (directions, alpha, center, tau, slope), strict=True))
    _check_x(x, params)
    cd = channel_dim_of(x, channel_dim)
    _check_parameters(x, params)
    K = _check_directions(x, directions, cd, channel_dim)
    if tuple(alpha.shape) != (K,):
        raise ValueError(f"fire.repair: alpha must be (K,) = ({K},), got {tuple(alpha.shape)}")
    _check_center(x, center, cd)
    for name, used_by in (("tau", TAU_MODES), ("slope", SLOPE_MODES)):
        t = params[name]
        if t is None:
            continue
        if mode not in used_by:
            raise ValueError(f"fire.repair: {name} is only used by the modes {used_by}, got mode={mode!r}")
        if tuple(t.shape) != (K,):
            raise ValueError(f"fire.repair: {name} must be (K,) = ({K},), got {tuple(t.shape)}")
    f32 = torch.float32
    t = None if tau is None else tau.to(f32).contiguous()
    g = None if slope is None else slope.to(f32).contiguous()
    return MODE_IDS[mode], alpha.to(f32).contiguous(), t, cd, g


def _check_x(x, params):
    """Every tensor's layout, then x's batch dim and dtype."""
    for name, t in (("x", x), *params.items()):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"fire.repair: {name} must be a dense (strided) tensor, got layout {t.layout}; "
                            "sparse and other layouts are not supported (call .to_dense() first)")
    if x.dim() < 1:
        raise ValueError("fire.repair: x must be (N, ...) with a batch dimension, got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fire.repair: x must be float32, float16 or bfloat16, got {x.dtype}")


def _check_parameters(x, params):
    """The parameters' devices and dtypes."""
    for name, t in params.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"fire.repair: {name} is on {t.device} but x is on {x.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fire.repair: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_directions(x, directions, cd, channel_dim) -> int:
    """The directions' shape for the row form; returns K."""
    if cd is None:
        feat = tuple(x.shape[1:])
        D = math.prod(feat)
        if not (directions.dim() == 2 and directions.shape[1] == D) and tuple(directions.shape[1:]) != feat:
            raise ValueError(
                f"fire.repair: directions must be (K, {D}) or (K, *{feat}), got {tuple(directions.shape)}")
    else:
        C = x.shape[cd]
        if not (directions.dim() == 2 and directions.shape[1] == C):
            raise ValueError(
                f"fire.repair: per-position directions must be (K, C) = (K, {C}) for channel_dim={channel_dim}, "
                f"got {tuple(directions.shape)}")
    K = directions.shape[0]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"fire.repair: directions must hold 1 to {MAX_K} directions, got K={K}")
    return K


def _check_center(x, center, cd):
    """center: (D,) or x.shape[1:] flattened, (C,) per position."""
    if center is None:
        return
    if cd is None:
        feat = tuple(x.shape[1:])
        shapes = ((math.prod(feat),), feat)
    else:
        shapes = ((x.shape[cd],),)
    if tuple(center.shape) not in shapes:
        allowed = " or ".join(map(str, shapes))
        raise ValueError(f"fire.repair: center must be {allowed}, got {tuple(center.shape)}")
