"""Streaming, mergeable estimation of backdoor directions at named layers.

Per layer the estimator keeps, in memory that does not grow with the number of samples:
- clean, poisoned and paired-difference counts and sums (float64);
- Frequent Directions sketches of the clean rows, the poisoned rows and the paired
  differences, for the K > 1 principal directions;
- seeded reservoirs of clean and of poisoned rows: the clean one calibrates tau and the score
  scale on the final directions, the poisoned one sets the sign of directions 2..K.

Directions (`LayerStats.directions`):
- beta = mean(h(x_p) - h(x_c)) over pairs, or mean h(A(x_p)) - mean h(A(x_c)) unpaired;
  paired with `paired_beta="control_variate"`: the pairs' mean difference corrected for how
  far their clean rows' mean lies from the clean mean (see `LayerStats.beta`);
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
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from fire_kernels import MAX_K
from fire_kernels.modes import MODES, SHIFT_MODES, TAU_MODES

from .attachment import RepairWrapper
from .inference import eval_mode
from .ops import _channel_dim
from .outputs import hidden_state
from .profile import LayerProfile, Profile, _sha256, fingerprint
from .sketch import FrequentDirections, Reservoir


class LayerStats:
    COUNTS = ("n_clean", "n_poison", "n_pairs")
    # sum_pair_*: the pairs' clean rows c, and d * c, c * c elementwise (d the difference), for
    # the control-variate beta; an earlier release's checkpoints lack them (see from_state_dict)
    PAIR_MOMENTS = ("sum_pair_clean", "sum_pair_dc", "sum_pair_cc")
    SUMS = ("sum_clean", "sum_poison", "sum_diff") + PAIR_MOMENTS
    SKETCHES = ("clean_sketch", "poison_sketch", "diff_sketch")
    SAMPLES = ("clean_sample", "poison_sample")

    def __init__(self, feature_shape, sketch_rows: int = 32, reservoir: int = 512, seed: int = 0):
        self.feature_shape = tuple(feature_shape)
        self.sketch_rows, self.reservoir, self.seed = sketch_rows, reservoir, seed
        D = 1
        for s in self.feature_shape:
            D *= s
        self.dim = D
        f64 = dict(dtype=torch.float64)
        self.n_clean, self.sum_clean = 0, torch.zeros(D, **f64)
        self.n_poison, self.sum_poison = 0, torch.zeros(D, **f64)
        self.n_pairs, self.sum_diff = 0, torch.zeros(D, **f64)
        for name in self.PAIR_MOMENTS:
            setattr(self, name, torch.zeros(D, **f64))
        self.pair_moments = True  # False: restored from a checkpoint that held pairs but not these
        self.clean_sketch = FrequentDirections(D, sketch_rows)
        self.poison_sketch = FrequentDirections(D, sketch_rows)
        self.diff_sketch = FrequentDirections(D, sketch_rows)
        self.clean_sample = Reservoir(D, reservoir, seed)
        self.poison_sample = Reservoir(D, reservoir, seed + 1)
        self._clean_pcs = None  # (n_clean, principal directions, variances): see _clean_principal

    # -- streaming updates: rows are (n, D) float tensors
    def add_clean(self, h: torch.Tensor) -> None:
        h = h.detach().cpu().double()
        self.n_clean += h.shape[0]
        self.sum_clean += h.sum(0)
        self.clean_sketch.update(h)
        self.clean_sample.update(h)

    def add_poisoned(self, h: torch.Tensor) -> None:
        h = h.detach().cpu()
        self.n_poison += h.shape[0]
        self.sum_poison += h.double().sum(0)
        self.poison_sketch.update(h)
        self.poison_sample.update(h)

    def add_pairs(self, h_clean: torch.Tensor, h_poisoned: torch.Tensor) -> None:
        c = h_clean.detach().cpu().double()
        self._add_differences(c, h_poisoned.detach().cpu().double() - c)
        self.add_clean(h_clean)
        self.add_poisoned(h_poisoned)

    def _add_differences(self, c: torch.Tensor, d: torch.Tensor) -> None:
        """Pairs as rows: the clean rows c and the differences d (float64, (n, D))."""
        self.n_pairs += d.shape[0]
        self.sum_diff += d.sum(0)
        self.sum_pair_clean += c.sum(0)
        self.sum_pair_dc += (d * c).sum(0)
        self.sum_pair_cc += (c * c).sum(0)
        self.diff_sketch.update(d)

    # -- state: named tensors, for merge, all_reduce and checkpoints
    def state_dict(self) -> dict:
        """Every statistic as a named tensor (copies), settings included."""
        state = {"feature_shape": torch.tensor(self.feature_shape, dtype=torch.int64),
                 "settings": torch.tensor([self.sketch_rows, self.reservoir, self.seed], dtype=torch.int64)}
        state.update(self._form_state())
        state.update({name: torch.tensor(getattr(self, name), dtype=torch.int64) for name in self.COUNTS})
        state.update({name: getattr(self, name).clone() for name in self.SUMS})
        state["pair_moments"] = torch.tensor(int(self.pair_moments), dtype=torch.int64)
        for name in self.SKETCHES + self.SAMPLES:
            state.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return state

    def _form_state(self) -> dict:
        return {}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LayerStats":
        _check_state(state)
        sketch_rows, reservoir, seed = (int(v) for v in state["settings"])
        shape = [int(s) for s in state["feature_shape"]]
        if "touched" in state:  # per-position statistics
            if len(shape) != 1:
                raise ValueError(f"per-position statistics hold (C,) rows, got feature_shape {shape}")
            out = PositionStats(shape[0], sketch_rows, reservoir, seed, touched=float(state["touched"]))
        else:
            out = LayerStats(shape, sketch_rows, reservoir, seed)
        for name in cls.COUNTS:
            setattr(out, name, int(state[name]))
        missing = [name for name in cls.PAIR_MOMENTS if name not in state]
        if missing:  # an older checkpoint: the mean beta is whole, the control variate unavailable
            state = {**state, **{name: torch.zeros(out.dim, dtype=torch.float64) for name in missing}}
            out.pair_moments = out.n_pairs == 0
        else:
            out.pair_moments = bool(state.get("pair_moments", 1))
        for name in cls.SUMS:
            if state[name].shape != (out.dim,):
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, expected ({out.dim},)")
            setattr(out, name, state[name].to(torch.float64).clone())
        for name in cls.SKETCHES + cls.SAMPLES:
            getattr(out, name).load_state_dict({k: state[f"{name}.{k}"] for k in ("rows", "seen")})
        # each count is the number of rows its sketch and reservoir saw: a count edited alone
        # (negated, doubled) would rescale the means it divides
        for count, parts in (("n_clean", ("clean_sketch", "clean_sample")),
                             ("n_poison", ("poison_sketch", "poison_sample")), ("n_pairs", ("diff_sketch",))):
            seen = {part: getattr(out, part).seen for part in parts}
            if any(v != getattr(out, count) for v in seen.values()):
                raise ValueError(f"{count} = {getattr(out, count)} disagrees with the rows its sketch and sample saw "
                                 f"({seen}): the checkpoint is inconsistent")
        return out

    def merge(self, other: "LayerStats") -> None:
        """Adds other's statistics to these (other is not changed, nothing is shared)."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__} (flattened and "
                             "per-position statistics describe different rows)")
        if other.feature_shape != self.feature_shape:
            raise ValueError(f"cannot merge stats of shapes {self.feature_shape} and {other.feature_shape}")
        for name in self.COUNTS + self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pair_moments = self.pair_moments and other.pair_moments
        for name in self.SKETCHES + self.SAMPLES:
            getattr(self, name).merge(getattr(other, name))

    def copy(self) -> "LayerStats":
        return LayerStats.from_state_dict(self.state_dict())

    # -- results
    def source(self, requested: str = "auto") -> str:
        if requested not in ("auto", "paired", "unpaired"):
            raise ValueError(f"source must be 'auto', 'paired' or 'unpaired', got {requested!r}")
        if requested == "auto":
            requested = "paired" if self.n_pairs else "unpaired"
        if requested == "paired" and self.n_pairs == 0:
            raise ValueError("no paired samples were observed (use observe_pairs)")
        if requested == "unpaired" and (self.n_clean == 0 or self.n_poison == 0):
            raise ValueError(f"unpaired estimation needs clean and poisoned samples; saw {self.n_clean} clean, "
                             f"{self.n_poison} poisoned")
        return requested

    def clean_mean(self) -> torch.Tensor:
        if self.n_clean == 0:
            raise ValueError("no clean samples were observed: the centre is undefined")
        return self.sum_clean / self.n_clean

    # Unpaired beta is shrunk along the clean data's principal directions (see _shrink_unpaired);
    # off where the poisoned rows are not draws of the clean distribution (per-position picks).
    shrink_unpaired = True

    def beta(self, source: str, paired_beta: str = "mean") -> torch.Tensor:
        if source == "paired":
            if paired_beta == "control_variate":
                return self._control_variate_beta()
            return self.sum_diff / self.n_pairs
        beta = self.sum_poison / self.n_poison - self.clean_mean()
        return self._shrink_unpaired(beta) if self.shrink_unpaired else beta

    def _control_variate_beta(self) -> torch.Tensor:
        """The pairs' mean difference, corrected for the sample of images the pairs happen to be.
        A trigger that blends (x' = (1 - a) x + a p) adds a(p - x): its mean over a few pairs
        carries a(mu - mean of their clean rows), a sampling error the clean mean (from many more
        rows) can remove. With one scalar regression of the differences on the pairs' clean rows,
        d_i = beta + g (c_i - mu) (g = -a for a blend, about 0 for a trigger that only adds), beta
        = mean(d) - g (mean(c) - mu). Measured on the digits ViT's Blended at the input: g = -0.200,
        and the repair matches the one built from the true pattern to 0.4 points of PA at every
        alpha (the mean difference: 0.8-5.9 points below it;
        benchmarks/results/digits-vit-blended-selection/)."""
        c_mean, d_mean = self.sum_pair_clean / self.n_pairs, self.sum_diff / self.n_pairs
        return d_mean - self.pair_slope() * (c_mean - self.clean_mean())

    def pair_slope(self) -> float:
        """g of the control-variate beta: the least-squares slope of the pairs' differences on
        their clean rows, d_i - mean(d) = g (c_i - mean(c)) (0 with fewer than two pairs)."""
        if not self.pair_moments:
            raise ValueError("these statistics come from a checkpoint without the pairs' moments (an earlier "
                             "release's): the control-variate beta needs the pairs observed again")
        n = self.n_pairs
        if n < 2:
            return 0.0
        c_mean, d_mean = self.sum_pair_clean / n, self.sum_diff / n
        cov = float(self.sum_pair_dc.sum()) - n * float(d_mean @ c_mean)
        var = float(self.sum_pair_cc.sum()) - n * float(c_mean @ c_mean)
        return cov / var if var > 1e-12 * float(self.sum_pair_cc.sum()) else 0.0

    def _shrink_unpaired(self, beta: torch.Tensor) -> torch.Tensor:
        """The unpaired mean difference with its sampling noise shrunk away. The poisoned images
        are other images than the clean ones, so beta carries their content difference: noise of
        covariance Sigma_c (1/n_p + 1/n_c), largest along the clean data's top principal
        directions (brightness, colour, layout in pixels). Along each principal direction u_i
        (variance lambda_i, from the clean reservoir), beta's coefficient b_i is kept in the
        share max(0, 1 - lambda_i (1/n_p + 1/n_c) / b_i^2) (a per-component Wiener factor);
        where the trigger dominates, b_i is kept whole. Measured on CIFAR-10 at the pixels
        (64 flagged images, clamp, best alpha of 1.5 / 2 / 3): Blended PA 21.5 -> 67.2 %, SIG
        71.2 -> 77.7 %; within 1 point at the conv blocks."""
        if self.clean_sample.rows.shape[0] < 3:
            return beta
        pcs, lam = self._clean_principal()
        coef = pcs @ beta
        noise = lam * (1.0 / self.n_poison + 1.0 / self.n_clean)
        share = (1 - noise / coef.pow(2).clamp_min(1e-300)).clamp_min(0)
        return beta - pcs.T @ ((1 - share) * coef)

    def _clean_principal(self):
        """(principal directions as orthonormal rows, their variances) of the clean reservoir,
        computed once per clean count (every clean row passes through the reservoir)."""
        if self._clean_pcs is None or self._clean_pcs[0] != self.n_clean:
            rows = self.clean_sample.rows.double()
            c = rows - rows.mean(0)
            gram_vals, gram_vecs = torch.linalg.eigh(c @ c.T)  # (R x R): cheap for R << D
            keep = gram_vals > gram_vals.max().clamp_min(1e-300) * 1e-10
            pcs = (gram_vecs[:, keep].T @ c) / gram_vals[keep].sqrt()[:, None]
            self._clean_pcs = (self.n_clean, pcs, gram_vals[keep] / (rows.shape[0] - 1))
        return self._clean_pcs[1:]

    def calibrate(self, name: str, mode: str, alpha: torch.Tensor, k: int, source: str, tau_quantile: float,
                  channel_dim: Optional[int] = None, paired_beta: str = "mean") -> LayerProfile:
        """These statistics as the repair at one layer: k directions from `source`, centre =
        the clean mean, tau = the `tau_quantile` of the clean projections (clamp, gated), score
        scale = their std; `alpha` (k,) as given. Shift subtracts beta's part along each direction
        (the paper's rule); gated subtracts it where the sample's score exceeds tau (the shift
        applied to what the clean data's quantile flags), nothing elsewhere. Invert is gated plus
        the pairs' slope g (`pair_slope`, on the first direction): a flagged row's distance to
        the centre is divided by 1 + alpha g, which undoes a trigger that blends (x' - mu =
        (1 + g)(x - mu) + beta); it needs pairs, and its beta is the control variate's (the
        one consistent with g)."""
        slope = None
        if mode == "invert":
            if source != "paired":
                raise ValueError("mode 'invert' needs paired samples: its slope is the pairs' regression")
            paired_beta = "control_variate"
            slope = torch.zeros(k)
            slope[0] = self.pair_slope()
        V = self.directions(k, source, paired_beta)
        center = self.clean_mean().float()
        proj = self.clean_projections(V, center)
        beta = self.beta(source, paired_beta).float()
        directions = V
        if mode in SHIFT_MODES:  # rows b_k = <beta, v_k> v_k; gated shifts the poisoned side only
            m = V @ beta
            m = m.clamp_min(0) if mode in ("gated", "invert") else m
            directions = m[:, None] * V
            proj = proj * m.to(proj.dtype)  # the scores of these rows (tau and the score scale in their units)
        fs = self.feature_shape
        tau = torch.quantile(proj, tau_quantile, dim=0).float() if mode in TAU_MODES else None
        return LayerProfile(name=name, mode=mode, directions=directions.reshape(k, *fs).contiguous(),
                            alpha=alpha.clone(), center=center.reshape(fs), tau=tau,
                            score_scale=proj.std(0).clamp_min(1e-12).float(), beta=beta.reshape(fs),
                            channel_dim=channel_dim, slope=slope)

    def directions(self, k: int, source: str, paired_beta: str = "mean") -> torch.Tensor:
        """(k, D) orthonormal rows; the first is beta / |beta|."""
        beta = self.beta(source, paired_beta)
        norm = beta.norm()
        if norm == 0:
            raise ValueError("the clean and poisoned activations have the same mean: no direction to estimate")
        v1 = beta / norm
        if k == 1:
            return v1[None].float()
        n_triggered = self.n_pairs if source == "paired" else self.n_poison
        if n_triggered < k:
            raise ValueError(f"k={k} directions need at least {k} triggered samples, got {n_triggered}")
        # S through the sketches: paired, S = sum_i d_i d_i^T. Unpaired, with P, C the sketches of
        # the poisoned and clean rows: S = sum_i (p_i - mu_c)(p_i - mu_c)^T - (n_p / n_c) sum_j
        # (c_j - mu_c)(c_j - mu_c)^T = P^T P - (n_p / n_c) C^T C - n_p (mu_c mu_p^T + mu_p mu_c^T)
        # + 2 n_p mu_c mu_c^T.
        if source == "paired":
            B, neg, low_rank = self.diff_sketch.matrix().double(), None, []
        else:
            B, C = self.poison_sketch.matrix().double(), self.clean_sketch.matrix().double()
            n, mu_c, mu_p = self.n_poison, self.clean_mean(), self.sum_poison / self.n_poison
            neg = (n / self.n_clean, C)
            low_rank = [(-n, mu_c, mu_p), (-n, mu_p, mu_c), (2 * n, mu_c, mu_c)]
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
        order = evals.argsort(descending=True)[: k - 1]
        supported = int((evals > 1e-9 * max(float(evals.max()), 1e-30)).sum())
        if supported < k - 1:
            raise ValueError(f"only {supported + 1} directions are supported by the data; asked for k={k}")
        rest = (Q @ evecs[:, order]).T
        V = torch.cat([v1[None], rest])
        V, _ = torch.linalg.qr(V.T)  # re-orthonormalise in fp64; QR keeps v1 first (up to sign)
        V = V.T
        V[0] *= 1.0 if float(V[0] @ beta) >= 0 else -1.0
        V[1:] *= self._poisoned_side(V[1:])[:, None]
        return V.float()

    def _poisoned_side(self, V: torch.Tensor) -> torch.Tensor:
        """+1 or -1 per row of V: the side on which the poisoned rows leave the clean range more
        (mean excess over the clean 99th percentile against mean shortfall under the 1st); ties
        (no poisoned row outside the clean range) go to the side of the poisoned rows' skew."""
        clean, poisoned = self.clean_sample.rows.double(), self.poison_sample.rows.double()
        if clean.shape[0] == 0 or poisoned.shape[0] == 0:
            return torch.ones(V.shape[0], dtype=V.dtype)
        mu = clean.mean(0)
        c, p = (clean - mu) @ V.T, (poisoned - mu) @ V.T
        hi, lo = torch.quantile(c, 0.99, dim=0), torch.quantile(c, 0.01, dim=0)
        side = (p - hi).clamp_min(0).mean(0) - (lo - p).clamp_min(0).mean(0)
        skew = ((p - p.mean(0)) ** 3).mean(0)
        side = torch.where(side.abs() > 1e-12 * (hi - lo).abs().clamp_min(1e-30), side, skew)
        return torch.where(side < 0, -1.0, 1.0).to(V.dtype)

    def clean_projections(self, V: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        rows = self.clean_sample.rows
        if rows.shape[0] < 2:
            raise ValueError(f"calibration needs at least 2 clean samples (tau and the score scale come from the "
                             f"spread of their projections), got {rows.shape[0]}")
        return (rows - center.float()) @ V.T


class PositionStats(LayerStats):
    """Per-position statistics: a row is the C channels at one position of a feature map (or
    one token), so the directions are (K, C) and apply wherever a trigger lands.

    A moving trigger touches a few positions of each image; the others carry no shift, and
    averaging over them would dilute the direction towards zero. So:
    - paired: per pair, only the positions whose difference norm is at least `touched` x the
      largest difference norm of that pair enter the differences (mean, sketch) and the
      poisoned statistics; every clean position enters the clean statistics;
    - unpaired: every position is kept (in a reservoir of rows); when directions are asked for,
      the poisoned positions that stand out from the clean ones (mean squared z-score over
      channels above the clean positions' 99th percentile) are the triggered rows, and the
      directions come from them against the clean statistics.
    Centre, tau and score scale are calibrated on clean positions: channel statistics shared by
    every position."""

    def __init__(self, channels: int, sketch_rows: int = 32, reservoir: int = 8192, seed: int = 0,
                 touched: float = 0.5):
        if not 0.0 < touched <= 1.0:
            raise ValueError(f"touched must be in (0, 1], got {touched}")
        super().__init__((channels,), sketch_rows, reservoir, seed)
        self.touched = touched

    def _form_state(self) -> dict:
        return {"touched": torch.tensor(self.touched, dtype=torch.float64)}

    @staticmethod
    def _flat(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])

    def add_clean(self, h: torch.Tensor) -> None:
        super().add_clean(self._flat(h))

    def add_poisoned(self, h: torch.Tensor) -> None:
        super().add_poisoned(self._flat(h))

    def add_pairs(self, h_clean: torch.Tensor, h_poisoned: torch.Tensor) -> None:
        c = h_clean.detach().cpu().double()
        d = h_poisoned.detach().cpu().double() - c  # (N, P, C)
        norms = d.norm(dim=2)
        touched = (norms >= self.touched * norms.amax(dim=1, keepdim=True)) & (norms > 0)
        self._add_differences(c[touched], d[touched])
        super().add_clean(self._flat(h_clean))
        super().add_poisoned(h_poisoned.detach().cpu()[touched])

    def _triggered(self) -> LayerStats:
        """Unpaired: statistics of the poisoned positions that stand out from the clean ones,
        with the clean statistics of all positions."""
        clean = self.clean_sample.rows.double()
        poisoned = self.poison_sample.rows.double()
        if clean.shape[0] < 2:
            raise ValueError(f"per-position unpaired estimation needs clean positions to compare with, "
                             f"got {clean.shape[0]}")
        mu = self.clean_mean()
        sd = clean.std(0).clamp_min(1e-12)

        def z(r):
            return ((r - mu) / sd).pow(2).mean(1)

        picked = poisoned[z(poisoned) > torch.quantile(z(clean), 0.99)]
        if picked.shape[0] == 0:
            raise ValueError("no poisoned position stands out from the clean positions: no direction to estimate")
        out = LayerStats(self.feature_shape, self.sketch_rows, picked.shape[0], self.seed)
        out.n_clean, out.sum_clean = self.n_clean, self.sum_clean.clone()
        out.clean_sketch, out.clean_sample = self.clean_sketch, self.clean_sample  # read only
        out.shrink_unpaired = False  # the picked positions stand out by construction: not clean-like draws
        out.add_poisoned(picked.float())
        return out

    def calibrate(self, name, mode, alpha, k, source, tau_quantile, channel_dim=None,
                  paired_beta="mean") -> LayerProfile:
        # unpaired: select the triggered positions once for both the directions and beta
        stats = self._triggered() if source == "unpaired" else super()
        return stats.calibrate(name, mode, alpha, k, source, tau_quantile, channel_dim, paired_beta)

    def beta(self, source: str, paired_beta: str = "mean") -> torch.Tensor:
        return self._triggered().beta(source) if source == "unpaired" else super().beta(source, paired_beta)

    def directions(self, k: int, source: str, paired_beta: str = "mean") -> torch.Tensor:
        if source == "unpaired":
            return self._triggered().directions(k, source)
        return super().directions(k, source, paired_beta)


PAIRED_BETAS = ("mean", "control_variate")
CHECKSUM = "sha256"  # per layer in Estimator.state_dict: SHA-256 of the layer's other entries, as 32 uint8


def _state_digest(state: dict) -> torch.Tensor:
    """SHA-256 of a layer's checkpointed statistics (names, shapes, dtypes, bytes), as 32 uint8."""
    return torch.tensor(list(bytes.fromhex(_sha256((k, state[k]) for k in sorted(state)))), dtype=torch.uint8)


def _check_state(state: dict) -> None:
    """A layer's checkpointed statistics before they are used: every entry present and a tensor
    of its kind (integer counts and settings, floating sums and rows), counts >= 0, settings
    >= 1, values finite. Raises ValueError or TypeError naming the entry."""
    S = LayerStats
    parts = [f"{n}.{k}" for n in S.SKETCHES + S.SAMPLES for k in ("rows", "seen")]
    required = ["feature_shape", "settings", *S.COUNTS, "sum_clean", "sum_poison", "sum_diff", *parts]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing}")
    unknown = sorted(set(state) - set(required) - set(S.PAIR_MOMENTS) - {"pair_moments", "touched"})
    if unknown:
        raise ValueError(f"the checkpoint has unknown entries {unknown}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{k} must be a tensor, got {type(v).__name__}")
        integer = k in ("feature_shape", "settings", "pair_moments", *S.COUNTS) or k.endswith(".seen")
        if integer and v.dtype != torch.int64:
            raise ValueError(f"{k} must be int64, got {v.dtype}")
        if not integer and not v.dtype.is_floating_point:
            raise ValueError(f"{k} must be floating point, got {v.dtype}")
        if integer and k not in ("feature_shape", "settings") and (v.dim() != 0 or int(v) < 0):
            raise ValueError(f"{k} must be a count >= 0, got {v.tolist()}")
        if not integer and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k} has non-finite values")
    if state["settings"].shape != (3,) or bool((state["settings"][:2] < 1).any()):
        raise ValueError(f"settings must be (sketch_rows >= 1, reservoir >= 1, seed), got {state['settings'].tolist()}")
    if state["feature_shape"].dim() != 1 or bool((state["feature_shape"] < 1).any()):
        raise ValueError(f"feature_shape must be positive sizes, got {state['feature_shape'].tolist()}")
    if "touched" in state and (state["touched"].dim() != 0 or not 0.0 < float(state["touched"]) <= 1.0):
        raise ValueError(f"touched must be a number in (0, 1], got {state['touched'].tolist()}")


def _check_k(k: int, sketch_rows: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    if sketch_rows < k:
        raise ValueError(f"sketch_rows ({sketch_rows}) must be at least k ({k})")


def _poison_mask(poisoned, n: int) -> Optional[torch.Tensor]:
    """None for a whole clean batch, or an (n,) bool tensor (True everywhere for poisoned=True)."""
    if isinstance(poisoned, (bool, np.bool_)):
        return torch.ones(n, dtype=torch.bool) if poisoned else None
    if isinstance(poisoned, torch.Tensor):
        mask = poisoned.detach().cpu()
    else:
        try:
            mask = torch.as_tensor(np.asarray(poisoned))
        except (TypeError, ValueError) as e:
            raise TypeError(f"poisoned must be a bool or a per-sample mask, got {type(poisoned).__name__}") from e
    if mask.dtype != torch.bool and mask.numel() == 0:  # [] (numpy makes it float64) for an empty batch
        mask = mask.to(torch.bool)
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"poisoned mask must hold booleans (or 0/1), got dtype {mask.dtype}")
        mask = mask.to(torch.bool)
    if tuple(mask.shape) != (n,):
        raise ValueError(f"poisoned mask must be ({n},), one flag per sample, got {tuple(mask.shape)}")
    return mask


class Estimator:
    """Collects activations at named layers through forward hooks and estimates directions.

    >>> est = Estimator(model, layers=["layer3"], k=1)
    >>> est.observe(x_clean, poisoned=False); est.observe(x_poisoned, poisoned=True)
    >>> profile = est.profile(mode="clamp", alpha=1.0)

    `per_position=True` estimates (K, C) directions over the channels at `channel_dim` (1 for
    NCHW maps, -1 for (N, T, C) tokens), applied at every position: for triggers that move, and
    for transformers. `touched` is the share of a pair's largest per-position difference that
    marks a position as touched by the trigger (see PositionStats); `reservoir` then counts
    positions, not samples (default 16 x 512).

    `paired_beta` is how paired observations give beta: "mean" (the mean difference, the
    paper's rule) or "control_variate" (corrected for the pairs' own sample of images; exact
    for blending triggers, see `LayerStats._control_variate_beta`).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str], k: int = 1,
                 augment: Optional[Callable] = None, n_augment: int = 1, sketch_rows: int = 32,
                 reservoir: Optional[int] = None, seed: int = 0, per_position: bool = False,
                 channel_dim: int = 1, touched: float = 0.5, paired_beta: str = "mean"):
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("name at least one layer")
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"the model has no layer(s) {missing}; it has e.g. {list(modules)[1:10]}")
        _check_k(k, sketch_rows)
        if n_augment < 1:
            raise ValueError(f"n_augment must be >= 1, got {n_augment}")
        if per_position and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim == 0):
            raise ValueError(f"channel_dim must be a non-zero int (the batch dim 0 is not a channel dim), "
                             f"got {channel_dim!r}")
        if not 0.0 < touched <= 1.0:
            raise ValueError(f"touched must be in (0, 1], got {touched}")
        if paired_beta not in PAIRED_BETAS:
            raise ValueError(f"paired_beta must be one of {PAIRED_BETAS}, got {paired_beta!r}")
        self.paired_beta = paired_beta
        self.model, self.layers, self.k = model, list(layers), k
        self.augment, self.n_augment = augment, n_augment
        self.per_position, self.channel_dim, self.touched = bool(per_position), channel_dim, touched
        if reservoir is None:
            reservoir = 512 * (16 if per_position else 1)
        self.sketch_rows, self.reservoir, self.seed = sketch_rows, reservoir, seed
        self.stats: dict = {}
        # a layer already repaired (attach) is hooked inside its wrapper: its own output, before the repair
        self._modules = {name: modules[name].layer if isinstance(modules[name], RepairWrapper)
                         else modules[name] for name in self.layers}

    # -- activations
    @property
    def form(self) -> str:
        return "per_position" if self.per_position else "flattened"

    def _new_stats(self, h: torch.Tensor) -> LayerStats:
        if self.per_position:
            return PositionStats(h.shape[-1], self.sketch_rows, self.reservoir, self.seed, self.touched)
        return LayerStats(h.shape[1:], self.sketch_rows, self.reservoir, self.seed)

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """A layer output as this estimator's rows: (N, D) fp32 flattened, or (N, P, C) fp32
        per position (the channel dim moved last, every other feature dim a position)."""
        if not self.per_position:
            return h.detach().reshape(h.shape[0], -1).float()
        hm = h.detach().movedim(_channel_dim(h, self.channel_dim), -1)  # the op's own check of channel_dim
        return hm.reshape(h.shape[0], -1, hm.shape[-1]).float()

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> dict:
        """The outputs of the named layers for x as rows (see `rows`), in eval mode."""
        captured = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(
                 name, hidden_state(out, name)))
                 for name, m in self._modules.items()]
        try:
            with eval_mode(self.model):
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for name in self.layers:
            if name not in captured:
                raise RuntimeError(f"layer {name!r} did not run in the forward pass")
            h = self.rows(captured[name])
            if name not in self.stats:
                self.stats[name] = self._new_stats(h if self.per_position else captured[name])
            # per position, only the channels must agree: positions may differ between batches
            shape = (h.shape[-1],) if self.per_position else tuple(captured[name].shape[1:])
            if shape != self.stats[name].feature_shape:
                what = "channels" if self.per_position else "shape"
                raise ValueError(f"layer {name!r} produced {what} {shape}, earlier {self.stats[name].feature_shape}")
            out[name] = h
        return out

    def _views(self, x):
        """x itself, or its augmented copies (the unpaired estimate averages over augmentations)."""
        if self.augment is None:
            return [x]
        views = [self.augment(x) for _ in range(self.n_augment)]
        for v in views:
            if not isinstance(v, torch.Tensor) or v.shape[:1] != x.shape[:1]:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"augment must return one augmented sample per input, a tensor of batch size "
                                 f"{x.shape[0]}; it returned {got}")
        return views

    # -- observation
    def observe(self, x: torch.Tensor, poisoned) -> None:
        """Unpaired: a batch of clean (poisoned=False) or poisoned (True) inputs, or a per-sample
        mask of which rows are poisoned (a bool tensor, numpy array or sequence, or 0/1 values).
        An empty batch is a no-op; non-finite activations are refused with nothing recorded."""
        mask = _poison_mask(poisoned, x.shape[0])
        if x.shape[0] == 0:
            return
        views = [self._finite(self.activations(view)) for view in self._views(x)]  # all checked first
        for acts in views:
            for name, h in acts.items():
                h = h.cpu()
                if mask is None or not bool(mask.all()):
                    self.stats[name].add_clean(h if mask is None else h[~mask])
                if mask is not None and bool(mask.any()):
                    self.stats[name].add_poisoned(h[mask])

    def observe_pairs(self, x_clean: torch.Tensor, x_poisoned: torch.Tensor) -> None:
        """Paired: row i of x_poisoned is row i of x_clean with the trigger (empty: a no-op)."""
        if x_clean.shape != x_poisoned.shape:
            raise ValueError(f"pairs must have equal shapes, got {tuple(x_clean.shape)} and {tuple(x_poisoned.shape)}")
        if x_clean.shape[0] == 0:
            return
        hc, hp = self._finite(self.activations(x_clean)), self._finite(self.activations(x_poisoned))
        for name in self.layers:
            self.stats[name].add_pairs(hc[name], hp[name])

    @staticmethod
    def _finite(acts: dict) -> dict:
        for name, h in acts.items():
            bad = ~torch.isfinite(h.reshape(h.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten()[:5].tolist()
                raise ValueError(f"non-finite activations at layer {name!r} (rows {rows}); nothing was recorded")
        return acts

    def observe_loader(self, batches: Iterable, poisoned=None, paired: bool = False, progress: bool = True,
                       desc: str = "estimating") -> None:
        """Feeds an iterable of batches: x, (x, poisoned_mask) or, with paired=True, (x_clean, x_poisoned)."""
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            if paired:
                self.observe_pairs(*batch[:2])
            elif poisoned is None:
                self.observe(batch[0], poisoned=batch[1])
            else:
                self.observe(batch[0] if isinstance(batch, (tuple, list)) else batch, poisoned=poisoned)

    # -- merging (several processes or shards)
    def merge(self, other: "Estimator") -> "Estimator":
        """Adds other's statistics to this one's (copied: later updates of either stay apart).
        Refused, with nothing changed, unless other observed the same model (same weights), in
        the same form, at layers this estimator watches."""
        unknown = sorted(set(other.stats) - set(self.layers))
        if unknown:
            raise ValueError(f"cannot merge statistics of layer(s) {unknown}: this estimator does not watch them "
                             f"({self.layers})")
        if other.per_position != self.per_position:
            raise ValueError(f"cannot merge {other.form} statistics into a {self.form} estimator")
        if other.model is not self.model and fingerprint(other.model) != fingerprint(self.model):
            raise ValueError("cannot merge an estimator of another model (the weights' fingerprints differ)")
        for name, stats in other.stats.items():
            if name not in self.stats:
                self.stats[name] = stats.copy()
            else:
                self.stats[name].merge(stats)
        return self

    def state_dict(self) -> dict:
        """{"<layer>/<statistic>": tensor}: a checkpoint of everything observed (save it with
        safetensors; load_state_dict restores it into an estimator on the same model)."""
        out = {}
        for layer, st in self.stats.items():
            state = st.state_dict()
            state[CHECKSUM] = _state_digest(state)
            out.update({f"{layer}/{k}": v for k, v in state.items()})
        return out

    def load_state_dict(self, state: dict, allow_unverified: bool = False) -> "Estimator":
        """Restores a checkpoint of `state_dict`. Refused with an error naming the layer and the
        statistic, and nothing changed, unless every entry is a tensor of a watched layer, the
        checksum of each layer's statistics matches, and they are consistent and of this
        estimator's form (flattened or per position). A checkpoint without checksums (an earlier
        release's) is refused unless `allow_unverified=True`: then only the consistency checks
        stand between an edited statistic and the directions."""
        per_layer: dict = {}
        for key, value in state.items():
            if not isinstance(key, str) or "/" not in key:
                raise ValueError(f"checkpoint key {key!r} is not '<layer>/<statistic>'")
            layer, _, name = key.rpartition("/")
            if layer not in self.layers:
                raise ValueError(f"state for layer {layer!r}, which this estimator does not watch ({self.layers})")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint entry {key!r} must be a tensor, got {type(value).__name__}")
            per_layer.setdefault(layer, {})[name] = value
        stats = {}
        for layer, st in per_layer.items():
            try:
                recorded = st.pop(CHECKSUM, None)  # absent from an earlier release's checkpoints
                _check_state(st)  # keys and kinds first: a missing entry is named, not a checksum mismatch
                if recorded is None and not allow_unverified:
                    raise ValueError(f"no '{CHECKSUM}' entry: the checkpoint carries no checksum (an earlier "
                                     "release's?); pass allow_unverified=True to load it anyway")
                if recorded is not None and (recorded.dtype != torch.uint8 or recorded.shape != (32,)
                                             or not torch.equal(recorded, _state_digest(st))):
                    raise ValueError("contents do not match the recorded checksum (tampered or damaged)")
                stats[layer] = LayerStats.from_state_dict(st)
            except (ValueError, TypeError) as e:
                raise type(e)(f"checkpoint of layer {layer!r}: {e}") from None
            if isinstance(stats[layer], PositionStats) != self.per_position:
                held = "flattened" if self.per_position else "per-position"
                raise ValueError(f"checkpoint of layer {layer!r}: {held} statistics, but this estimator is {self.form}")
        self.stats = stats
        return self

    def clone(self) -> "Estimator":
        """An estimator on the same model and settings with a copy of these statistics (what
        selection extends with the pairs of each fold)."""
        out = Estimator(self.model, self.layers, self.k, self.augment, self.n_augment, self.sketch_rows,
                        self.reservoir, self.seed, self.per_position, self.channel_dim, self.touched,
                        self.paired_beta)
        return out.merge(self)

    def all_reduce(self, group=None) -> "Estimator":
        """Merges the estimators of all ranks of a torch.distributed group, in rank order, so every
        rank ends with the same statistics (tensor collectives only, nothing is pickled)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        for name in self.layers:
            mine = self.stats.get(name)
            if mine is None:
                raise RuntimeError(f"rank {dist.get_rank(group)} has observed nothing at {name!r}")
            gathered = [_gather_stats(mine, src, group) for src in range(world)]
            total = gathered[0]
            for other in gathered[1:]:
                total.merge(other)
            self.stats[name] = total
        return self

    # -- the profile
    def profile(self, mode: str = "clamp", alpha: Union[float, Sequence[float]] = 1.0, tau_quantile: float = 0.99,
                source: str = "auto", k: Optional[int] = None, layers: Optional[Sequence[str]] = None,
                with_fingerprint: bool = True) -> Profile:
        """Calibrates centre (clean mean), tau (the `tau_quantile` of the clean projections),
        score scale (their std) and packs a Profile for the named layers (default: all).
        `with_fingerprint=False` skips hashing the model's weights (for profiles rebuilt many
        times on a model known to be unchanged: online refreshes, selection candidates)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= tau_quantile <= 1.0:
            raise ValueError(f"tau_quantile must be in [0, 1], got {tau_quantile}")
        k = self.k if k is None else k
        _check_k(k, self.sketch_rows)
        a = torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if a.numel() == 1:
            a = a.expand(k).clone()
        if a.shape != (k,):
            raise ValueError(f"alpha must be a float or {k} values, got {a.numel()}")
        out, info = [], {"k": k, "tau_quantile": tau_quantile, "layers": {}}
        for name in layers or self.layers:
            if name not in self.stats:
                raise ValueError(f"nothing was observed at layer {name!r}")
            st = self.stats[name]
            src = st.source(source)
            layer = st.calibrate(name, mode, a, k, src, tau_quantile,
                                 channel_dim=self.channel_dim if self.per_position else None,
                                 paired_beta=self.paired_beta)
            out.append(layer)
            # per position, the counts are of rows (positions), not of samples
            info["layers"][name] = {"source": src, "form": self.form, "n_clean": st.n_clean,
                                    "n_poisoned": st.n_poison, "n_pairs": st.n_pairs,
                                    "beta_norm": float(layer.beta.norm())}
            if src == "paired":
                info["layers"][name]["paired_beta"] = self.paired_beta
        return Profile(layers=out, fingerprint=fingerprint(self.model) if with_fingerprint else None, info=info)


def _gather_stats(stats: LayerStats, src: int, group) -> LayerStats:
    """A copy of rank `src`'s LayerStats on every rank: every rank has the same state keys and
    dtypes, so only the shapes travel first (one int64 tensor), then each tensor."""
    import torch.distributed as dist

    state = stats.state_dict()
    names = sorted(state)
    shapes = torch.zeros(len(names), 3, dtype=torch.int64)  # ndim, then up to two sizes
    for i, name in enumerate(names):
        t = state[name]
        shapes[i, 0] = t.dim()
        shapes[i, 1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(shapes, src, group=group)
    out = {}
    for i, name in enumerate(names):
        shape = shapes[i, 1:1 + int(shapes[i, 0])].tolist()
        t = state[name] if dist.get_rank(group) == src else torch.empty(shape, dtype=state[name].dtype)
        dist.broadcast(t, src, group=group)
        out[name] = t
    return LayerStats.from_state_dict(out)
