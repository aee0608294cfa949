"""A layer's statistics as its repair: directions, centre, tau and score scale in a `LayerProfile`."""
from typing import Optional

import torch

from fire_kernels.modes import SHIFT_MODES, TAU_MODES

from .directions import Evidence, beta, directions, pair_slope, unpaired_slope
from .profile import LayerProfile
from .stats import PositionStats


def evidence(st, source: str) -> Evidence:
    """What an estimate from `source` reads of `LayerStats` or `PositionStats`: per position
    unpaired, the poisoned positions that stand out (`PositionStats.triggered`) against every
    clean position, unshrunk."""
    if not isinstance(st, PositionStats):
        return Evidence(st, st)
    if source == "unpaired":
        return Evidence(st.flat, st.triggered(), shrink_unpaired=False)
    return Evidence(st.flat, st.flat)


def calibrate(st, name: str, mode: str, alpha: torch.Tensor, k: int, source: str, tau_quantile: float,
              channel_dim: Optional[int] = None, paired_beta: str = "mean") -> LayerProfile:
    """The statistics `st` as the repair at one layer: k directions from `source`, centre =
    the clean mean, tau = the `tau_quantile` of the clean projections (clamp, gated), score
    scale = their std; `alpha` (k,) as given. Shift subtracts beta's part along each direction
    (the paper's rule); gated subtracts it where the sample's score exceeds tau (the shift
    applied to what the clean data's quantile flags), nothing elsewhere. Invert is gated plus
    a slope g on the first direction: a flagged row's distance to the centre is divided by
    1 + alpha g, which undoes a trigger that blends (x' - mu = (1 + g)(x - mu) + beta). Paired,
    g is the pairs' regression (`pair_slope`) and beta the control variate's (the one
    consistent with g); unpaired (flattened only), g compares the flagged rows' spread with the
    clean rows' (`unpaired_slope`) and beta is the unpaired one."""
    ev = evidence(st, source)  # per position unpaired: the positions are picked once, for directions and beta
    slope = None
    if mode == "invert":
        slope = torch.zeros(k)
        if source == "paired":
            paired_beta = "control_variate"
            slope[0] = pair_slope(ev.triggered)
        elif isinstance(st, PositionStats):  # the picked positions are no draws of the clean positions
            raise ValueError("mode 'invert' per position needs paired samples: unpaired, its slope compares the "
                             "flagged rows' spread with the clean rows', which picked positions do not share")
        else:
            slope[0] = unpaired_slope(ev)
    V = directions(ev, k, source, paired_beta)
    center = ev.clean.clean_mean().float()
    proj = clean_projections(ev.clean.clean_sample.rows, V, center)
    b = beta(ev, source, paired_beta).float()
    rows = V
    if mode in SHIFT_MODES:  # rows b_k = <beta, v_k> v_k; gated shifts the poisoned side only
        m = V @ b
        m = m.clamp_min(0) if mode in ("gated", "invert") else m
        rows = m[:, None] * V
        proj = proj * m.to(proj.dtype)  # the scores of these rows (tau and the score scale in their units)
    fs = st.feature_shape
    tau = torch.quantile(proj, tau_quantile, dim=0).float() if mode in TAU_MODES else None
    return LayerProfile(name=name, mode=mode, directions=rows.reshape(k, *fs).contiguous(),
                        alpha=alpha.clone(), center=center.reshape(fs), tau=tau,
                        score_scale=proj.std(0).clamp_min(1e-12).float(), beta=b.reshape(fs),
                        channel_dim=channel_dim, slope=slope)


def clean_projections(rows: torch.Tensor, V: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(R, k): the clean reservoir's rows about `center` projected on the rows of V; refused
    with fewer than 2 rows (no spread to calibrate on)."""
    if rows.shape[0] < 2:
        raise ValueError(f"calibration needs at least 2 clean samples (tau and the score scale come from the "
                         f"spread of their projections), got {rows.shape[0]}")
    return (rows - center.float()) @ V.T
