"""Backdoor directions from a layer's running statistics (`stats.LayerStats`). The functions
read the statistics and change nothing.

- beta = mean(h(x_p) - h(x_c)) over pairs, or mean h(A(x_p)) - mean h(A(x_c)) unpaired (shrunk
  along the clean principal directions, see `shrink_unpaired`); paired with
  `paired_beta="control_variate"`: the pairs' mean difference corrected for how far their
  clean rows' mean lies from the clean mean (see `control_variate_beta`);
- v_1 = beta / |beta| (so K = 1 is exactly the paper's direction);
- v_2..v_K: the top principal directions of what the trigger adds, after removing the v_1
  component: paired, of the differences' second moment; unpaired, of the poisoned second
  moment about the clean mean minus the clean covariance (scaled to the same count), so that
  the clean data's own spread is not mistaken for the trigger's.
- Signs: v_1 points along beta. v_2..v_K are orthogonal to beta, so the mean difference says
  nothing about their sign (it would be rounding noise); each is oriented towards the side
  where the poisoned rows leave the clean range more (their excess over the clean 99th
  percentile against their shortfall under the 1st), which is what the one-sided `clamp`
  mode needs.
"""
import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:  # stats imports this module
    from .stats import LayerStats

PAIRED_BETAS = ("mean", "control_variate")


class Evidence(NamedTuple):
    """What one estimate reads. The clean side (count, mean, sketch, reservoir) comes from
    `clean`; the pairs and the poisoned side (count, sum, sketch, reservoir) from `triggered`.
    Both are the same statistics, except per position unpaired: there `triggered` holds only
    the poisoned positions that stand out (`PositionStats.triggered`). `shrink_unpaired`: the
    unpaired beta is shrunk along the clean principal directions (off where the poisoned rows
    are not draws of the clean distribution, as the picked positions are not)."""
    clean: "LayerStats"
    triggered: "LayerStats"
    shrink_unpaired: bool = True


def choose_source(st, requested: str = "auto") -> str:
    """'paired' or 'unpaired': `requested`, or for 'auto' paired where pairs were observed;
    refused where the statistics lack what that source needs."""
    if requested not in ("auto", "paired", "unpaired"):
        raise ValueError(f"source must be 'auto', 'paired' or 'unpaired', got {requested!r}")
    if requested == "auto":
        requested = "paired" if st.n_pairs else "unpaired"
    if requested == "paired" and st.n_pairs == 0:
        raise ValueError("no paired samples were observed (use observe_pairs)")
    if requested == "unpaired" and (st.n_clean == 0 or st.n_poison == 0):
        raise ValueError(f"unpaired estimation needs clean and poisoned samples; saw {st.n_clean} clean, "
                         f"{st.n_poison} poisoned")
    return requested


def beta(ev: Evidence, source: str, paired_beta: str = "mean") -> torch.Tensor:
    """The trigger's mean shift (D,) float64 from `source` ('paired' or 'unpaired')."""
    if source == "paired":
        if paired_beta == "control_variate":
            return control_variate_beta(ev)
        return ev.triggered.sum_diff / ev.triggered.n_pairs
    b = ev.triggered.sum_poison / ev.triggered.n_poison - ev.clean.clean_mean()
    if not ev.shrink_unpaired or ev.clean.clean_sample.rows.shape[0] < 3:
        return b
    pcs, lam = _clean_principal(ev.clean)
    return shrink_unpaired(b, pcs, lam, ev.triggered.n_poison, ev.clean.n_clean)


def control_variate_beta(ev: Evidence) -> torch.Tensor:
    """The pairs' mean difference, corrected for the sample of images the pairs happen to be.
    A trigger that blends (x' = (1 - a) x + a p) adds a(p - x): its mean over a few pairs
    carries a(mu - mean of their clean rows), a sampling error the clean mean (from many more
    rows) can remove. With one scalar regression of the differences on the pairs' clean rows,
    d_i = beta + g (c_i - mu) (g = -a for a blend, about 0 for a trigger that only adds), beta
    = mean(d) - g (mean(c) - mu). Measured on the digits ViT's Blended at the input: g = -0.200,
    and the repair matches the one built from the true pattern to 0.4 points of PA at every
    alpha (the mean difference: 0.8-5.9 points below it;
    benchmarks/results/digits-vit-blended-selection/)."""
    pairs = ev.triggered
    c_mean, d_mean = pairs.sum_pair_clean / pairs.n_pairs, pairs.sum_diff / pairs.n_pairs
    return d_mean - pair_slope(pairs) * (c_mean - ev.clean.clean_mean())


def pair_slope(st) -> float:
    """g of the control-variate beta: the least-squares slope of the pairs' differences on
    their clean rows, d_i - mean(d) = g (c_i - mean(c)) (0 with fewer than two pairs)."""
    if not st.pair_moments:
        raise ValueError("these statistics come from a checkpoint without the pairs' moments (an earlier "
                         "release's): the control-variate beta needs the pairs observed again")
    n = st.n_pairs
    if n < 2:
        return 0.0
    c_mean, d_mean = st.sum_pair_clean / n, st.sum_diff / n
    cov = float(st.sum_pair_dc.sum()) - n * float(d_mean @ c_mean)
    var = float(st.sum_pair_cc.sum()) - n * float(c_mean @ c_mean)
    return cov / var if var > 1e-12 * float(st.sum_pair_cc.sum()) else 0.0


def unpaired_slope(ev: Evidence) -> float:
    """g without pairs. A trigger that blends maps every row to x' - mu = (1 + g)(x - mu) + beta,
    so the flagged rows, other draws of the clean distribution, spread (1 + g)^2 times as much
    as the clean rows: 1 + g = sqrt(total variance of the flagged rows / that of the clean
    rows), from the two reservoirs, pooled over every feature as `pair_slope` pools its
    regression. A trigger that only adds leaves the spread alone (g near 0); one that
    collapses the rows toward one point gives g near -1. 0 with fewer than two rows on either
    side or clean rows that do not vary."""
    p, c = ev.triggered.poison_sample.rows, ev.clean.clean_sample.rows
    if p.shape[0] < 2 or c.shape[0] < 2:
        return 0.0
    vp, vc = float(p.double().var(0).sum()), float(c.double().var(0).sum())
    return (vp / vc) ** 0.5 - 1.0 if vc > 0 else 0.0


def shrink_unpaired(beta: torch.Tensor, pcs: torch.Tensor, variances: torch.Tensor, n_poison: int,
                    n_clean: int) -> torch.Tensor:
    """The unpaired mean difference with its sampling noise shrunk away. The poisoned images
    are other images than the clean ones, so beta carries their content difference: noise of
    covariance Sigma_c (1/n_p + 1/n_c), largest along the clean data's top principal
    directions `pcs` (orthonormal rows; brightness, colour, layout in pixels). Along each u_i
    (variance lambda_i), beta's coefficient b_i is kept in the share max(0, 1 - lambda_i
    (1/n_p + 1/n_c) / b_i^2) (a per-component Wiener factor); where the trigger dominates, b_i
    is kept whole. Measured on CIFAR-10 at the pixels (64 flagged images, clamp, best alpha of
    1.5 / 2 / 3): Blended PA 21.5 -> 67.2 %, SIG 71.2 -> 77.7 %; within 1 point at the conv
    blocks."""
    coef = pcs @ beta
    noise = variances * (1.0 / n_poison + 1.0 / n_clean)
    share = (1 - noise / coef.pow(2).clamp_min(1e-300)).clamp_min(0)
    return beta - pcs.T @ ((1 - share) * coef)


def clean_principal_components(rows: torch.Tensor):
    """(principal directions as orthonormal rows, their variances) of a sample of rows (R, D),
    through the R x R Gram matrix (cheap for R << D); directions of negligible variance are left
    out."""
    rows = rows.double()
    c = rows - rows.mean(0)
    gram_vals, gram_vecs = torch.linalg.eigh(c @ c.T)
    keep = gram_vals > gram_vals.max().clamp_min(1e-300) * 1e-10
    pcs = (gram_vecs[:, keep].T @ c) / gram_vals[keep].sqrt()[:, None]
    return pcs, gram_vals[keep] / (rows.shape[0] - 1)


# statistics -> (n_clean, pcs, variances): every clean row passes through the reservoir, so the
# clean count says when it changed
_PRINCIPAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _clean_principal(st):
    """`clean_principal_components` of st's clean reservoir, computed once per clean count."""
    memo = _PRINCIPAL.get(st)
    if memo is None or memo[0] != st.n_clean:
        memo = (st.n_clean, *clean_principal_components(st.clean_sample.rows))
        _PRINCIPAL[st] = memo
    return memo[1:]


def directions(ev: Evidence, k: int, source: str, paired_beta: str = "mean") -> torch.Tensor:
    """(k, D) orthonormal rows; the first is beta / |beta|, the others oriented by
    `poisoned_side`."""
    b = beta(ev, source, paired_beta)
    norm = b.norm()
    if norm == 0:
        raise ValueError("the clean and poisoned activations have the same mean: no direction to estimate")
    v1 = b / norm
    if k == 1:
        return v1[None].float()
    n_triggered = ev.triggered.n_pairs if source == "paired" else ev.triggered.n_poison
    if n_triggered < k:
        raise ValueError(f"k={k} directions need at least {k} triggered samples, got {n_triggered}")
    V = torch.cat([v1[None], _trigger_directions(ev, source, v1, k - 1)])
    V, _ = torch.linalg.qr(V.T)  # re-orthonormalise in fp64; QR keeps v1 first (up to sign)
    V = V.T
    V[0] *= 1.0 if float(V[0] @ b) >= 0 else -1.0
    V[1:] *= poisoned_side(V[1:], ev.clean.clean_sample.rows, ev.triggered.poison_sample.rows)[:, None]
    return V.float()


def _trigger_directions(ev: Evidence, source: str, v1: torch.Tensor, n: int) -> torch.Tensor:
    """(n, D): the top eigenvectors of S, the second moment of what the trigger adds, with v1
    removed; refused where the data support fewer than n of them."""
    # S through the sketches: paired, S = sum_i d_i d_i^T. Unpaired, with P, C the sketches of
    # the poisoned and clean rows: S = sum_i (p_i - mu_c)(p_i - mu_c)^T - (n_p / n_c) sum_j
    # (c_j - mu_c)(c_j - mu_c)^T = P^T P - (n_p / n_c) C^T C - n_p (mu_c mu_p^T + mu_p mu_c^T)
    # + 2 n_p mu_c mu_c^T.
    if source == "paired":
        B, neg, low_rank = ev.triggered.diff_sketch.matrix().double(), None, []
    else:
        B, C = ev.triggered.poison_sketch.matrix().double(), ev.clean.clean_sketch.matrix().double()
        n_p, mu_c, mu_p = ev.triggered.n_poison, ev.clean.clean_mean(), ev.triggered.sum_poison / ev.triggered.n_poison
        neg = (n_p / ev.clean.n_clean, C)
        low_rank = [(-n_p, mu_c, mu_p), (-n_p, mu_p, mu_c), (2 * n_p, mu_c, mu_c)]
    parts = [B, v1[None]] + ([neg[1]] if neg is not None else [])
    basis = torch.cat(parts + [torch.stack([a, b]) for _, a, b in low_rank]).T
    U, sv, _ = torch.linalg.svd(basis, full_matrices=False)
    Q = U[:, sv > sv.max() * 1e-9]  # (D, r) orthonormal: the span where S lives (v1 included)
    BQ = B @ Q
    small = BQ.T @ BQ
    if neg is not None:
        CQ = neg[1] @ Q
        small -= neg[0] * (CQ.T @ CQ)
    for w, a, b in low_rank:
        small += w * torch.outer(a @ Q, b @ Q)
    deflate = torch.eye(Q.shape[1], dtype=small.dtype) - torch.outer(v1 @ Q, v1 @ Q)  # remove v1
    small = deflate @ ((small + small.T) / 2) @ deflate
    evals, evecs = torch.linalg.eigh(small)
    order = evals.argsort(descending=True)[:n]
    supported = int((evals > 1e-9 * max(float(evals.max()), 1e-30)).sum())
    if supported < n:
        raise ValueError(f"only {supported + 1} directions are supported by the data; asked for k={n + 1}")
    return (Q @ evecs[:, order]).T


def poisoned_side(V: torch.Tensor, clean_rows: torch.Tensor, poisoned_rows: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per row of V: the side on which the poisoned rows leave the clean range more
    (mean excess over the clean 99th percentile against mean shortfall under the 1st); ties
    (no poisoned row outside the clean range) go to the side of the poisoned rows' skew; +1
    everywhere without clean or poisoned rows."""
    clean, poisoned = clean_rows.double(), poisoned_rows.double()
    if clean.shape[0] == 0 or poisoned.shape[0] == 0:
        return torch.ones(V.shape[0], dtype=V.dtype)
    mu = clean.mean(0)
    c, p = (clean - mu) @ V.T, (poisoned - mu) @ V.T
    hi, lo = torch.quantile(c, 0.99, dim=0), torch.quantile(c, 0.01, dim=0)
    side = (p - hi).clamp_min(0).mean(0) - (lo - p).clamp_min(0).mean(0)
    skew = ((p - p.mean(0)) ** 3).mean(0)
    side = torch.where(side.abs() > 1e-12 * (hi - lo).abs().clamp_min(1e-30), side, skew)
    return torch.where(side < 0, -1.0, 1.0).to(V.dtype)
