"""Running statistics of one layer's rows: what the estimator accumulates, merges and checkpoints.

Per layer, in memory that does not grow with the number of samples:
- clean, poisoned and paired-difference counts and sums (float64), and the pairs' moments the
  control-variate beta needs;
- Frequent Directions sketches of the clean rows, the poisoned rows and the paired
  differences, for the K > 1 principal directions;
- seeded reservoirs of clean and of poisoned rows: the clean one calibrates tau and the score
  scale on the final directions, the poisoned one sets the sign of directions 2..K.

`LayerStats` holds them for flattened rows; `PositionStats` wraps one `LayerStats` of (C,)
rows, one per position, and decides which positions of a pair enter it. What the statistics
mean (directions, calibration) is in `directions` and `calibrate`.
"""
import torch

from . import directions
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
        self.add_differences(c, h_poisoned.detach().cpu().double() - c)
        self.add_clean(h_clean)
        self.add_poisoned(h_poisoned)

    def add_differences(self, c: torch.Tensor, d: torch.Tensor) -> None:
        """Pairs as rows: the clean rows c and the differences d (float64, (n, D)); the pairs'
        clean and poisoned rows themselves are added apart (add_clean, add_poisoned)."""
        self.n_pairs += d.shape[0]
        self.sum_diff += d.sum(0)
        self.sum_pair_clean += c.sum(0)
        self.sum_pair_dc += (d * c).sum(0)
        self.sum_pair_cc += (c * c).sum(0)
        self.diff_sketch.update(d)

    # -- what the counts say directly
    def clean_mean(self) -> torch.Tensor:
        if self.n_clean == 0:
            raise ValueError("no clean samples were observed: the centre is undefined")
        return self.sum_clean / self.n_clean

    def pair_slope(self) -> float:
        """g of the control-variate beta (see `directions.pair_slope`)."""
        return directions.pair_slope(self)

    # -- state: named tensors, for merge, all_reduce and checkpoints
    def state_dict(self) -> dict:
        """Every statistic as a named tensor (copies), settings included."""
        state = {"feature_shape": torch.tensor(self.feature_shape, dtype=torch.int64),
                 "settings": torch.tensor([self.sketch_rows, self.reservoir, self.seed], dtype=torch.int64)}
        state.update(self._statistics_state())
        return state

    def _statistics_state(self) -> dict:
        """The entries after the settings (a per-position state puts 'touched' between)."""
        state = {name: torch.tensor(getattr(self, name), dtype=torch.int64) for name in self.COUNTS}
        state.update({name: getattr(self, name).clone() for name in self.SUMS})
        state["pair_moments"] = torch.tensor(int(self.pair_moments), dtype=torch.int64)
        for name in self.SKETCHES + self.SAMPLES:
            state.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "LayerStats":
        """Flattened statistics from `state_dict` (per-position ones: `stats_from_state_dict`).
        Raises ValueError or TypeError naming the entry unless the state is complete,
        well-typed and consistent."""
        check_state(state)
        if "touched" in state:
            raise ValueError("a per-position state (it has 'touched'): restore it with stats_from_state_dict")
        sketch_rows, reservoir, seed = (int(v) for v in state["settings"])
        out = cls([int(s) for s in state["feature_shape"]], sketch_rows, reservoir, seed)
        out._fill(state)
        return out

    def _fill(self, state: dict) -> None:
        """Loads the statistics of a checked state into these new ones, and checks that each
        count is the number of rows its sketch and reservoir saw."""
        for name in self.COUNTS:
            setattr(self, name, int(state[name]))
        missing = [name for name in self.PAIR_MOMENTS if name not in state]
        if missing:  # an older checkpoint: the mean beta is whole, the control variate unavailable
            state = {**state, **{name: torch.zeros(self.dim, dtype=torch.float64) for name in missing}}
            self.pair_moments = self.n_pairs == 0
        else:
            self.pair_moments = bool(state.get("pair_moments", 1))
        for name in self.SUMS:
            if state[name].shape != (self.dim,):
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, expected ({self.dim},)")
            setattr(self, name, state[name].to(torch.float64).clone())
        for name in self.SKETCHES + self.SAMPLES:
            getattr(self, name).load_state_dict({k: state[f"{name}.{k}"] for k in ("rows", "seen")})
        # each count is the number of rows its sketch and reservoir saw: a count edited alone
        # (negated, doubled) would rescale the means it divides
        for count, parts in (("n_clean", ("clean_sketch", "clean_sample")),
                             ("n_poison", ("poison_sketch", "poison_sample")), ("n_pairs", ("diff_sketch",))):
            seen = {part: getattr(self, part).seen for part in parts}
            if any(v != getattr(self, count) for v in seen.values()):
                raise ValueError(f"{count} = {getattr(self, count)} disagrees with the rows its sketch and sample saw "
                                 f"({seen}): the checkpoint is inconsistent")

    def merge(self, other: "LayerStats") -> None:
        """Adds other's statistics to these (other is not changed, nothing is shared)."""
        _check_mergeable(self, other)
        for name in self.COUNTS + self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pair_moments = self.pair_moments and other.pair_moments
        for name in self.SKETCHES + self.SAMPLES:
            getattr(self, name).merge(getattr(other, name))

    def copy(self) -> "LayerStats":
        return LayerStats.from_state_dict(self.state_dict())


class PositionStats:
    """Per-position statistics: a row is the C channels at one position of a feature map (or
    one token), so the directions are (K, C) and apply wherever a trigger lands. The rows are
    kept in `flat`, a `LayerStats` of shape (C,).

    A moving trigger touches a few positions of each image; the others carry no shift, and
    averaging over them would dilute the direction towards zero. So:
    - paired: per pair, only the positions whose difference norm is at least `touched` x the
      largest difference norm of that pair enter the differences (mean, sketch) and the
      poisoned statistics; every clean position enters the clean statistics;
    - unpaired: every position is kept (in a reservoir of rows); when directions are asked for,
      `triggered` picks the poisoned positions that stand out from the clean ones (mean squared
      z-score over channels above the clean positions' 99th percentile), and the directions
      come from them against the clean statistics.
    Centre, tau and score scale are calibrated on clean positions: channel statistics shared by
    every position."""

    def __init__(self, channels: int, sketch_rows: int = 32, reservoir: int = 8192, seed: int = 0,
                 touched: float = 0.5):
        if not 0.0 < touched <= 1.0:
            raise ValueError(f"touched must be in (0, 1], got {touched}")
        self.flat = LayerStats((channels,), sketch_rows, reservoir, seed)
        self.touched = touched

    # what callers read of any statistics: counts of rows (positions), settings, the clean mean
    feature_shape = property(lambda self: self.flat.feature_shape)
    n_clean = property(lambda self: self.flat.n_clean)
    n_poison = property(lambda self: self.flat.n_poison)
    n_pairs = property(lambda self: self.flat.n_pairs)

    def clean_mean(self) -> torch.Tensor:
        return self.flat.clean_mean()

    def pair_slope(self) -> float:
        return self.flat.pair_slope()

    # -- streaming updates: rows are (n, P, C) or (n, C)
    @staticmethod
    def _rows(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])

    def add_clean(self, h: torch.Tensor) -> None:
        self.flat.add_clean(self._rows(h))

    def add_poisoned(self, h: torch.Tensor) -> None:
        self.flat.add_poisoned(self._rows(h))

    def add_pairs(self, h_clean: torch.Tensor, h_poisoned: torch.Tensor) -> None:
        c = h_clean.detach().cpu().double()
        d = h_poisoned.detach().cpu().double() - c  # (N, P, C)
        norms = d.norm(dim=2)
        touched = (norms >= self.touched * norms.amax(dim=1, keepdim=True)) & (norms > 0)
        self.flat.add_differences(c[touched], d[touched])
        self.flat.add_clean(self._rows(h_clean))
        self.flat.add_poisoned(h_poisoned.detach().cpu()[touched])

    def triggered(self) -> LayerStats:
        """Unpaired: statistics of their own holding only the poisoned positions that stand out
        from the clean ones (their poisoned side; the clean side stays in `flat`)."""
        clean = self.flat.clean_sample.rows.double()
        poisoned = self.flat.poison_sample.rows.double()
        if clean.shape[0] < 2:
            raise ValueError(f"per-position unpaired estimation needs clean positions to compare with, "
                             f"got {clean.shape[0]}")
        mu = self.flat.clean_mean()
        sd = clean.std(0).clamp_min(1e-12)

        def z(r):
            return ((r - mu) / sd).pow(2).mean(1)

        picked = poisoned[z(poisoned) > torch.quantile(z(clean), 0.99)]
        if picked.shape[0] == 0:
            raise ValueError("no poisoned position stands out from the clean positions: no direction to estimate")
        out = LayerStats(self.feature_shape, self.flat.sketch_rows, picked.shape[0], self.flat.seed)
        out.add_poisoned(picked.float())
        return out

    # -- state
    def state_dict(self) -> dict:
        """The flat statistics' state with 'touched' after the settings."""
        flat = self.flat.state_dict()
        state = {k: flat.pop(k) for k in ("feature_shape", "settings")}
        state["touched"] = torch.tensor(self.touched, dtype=torch.float64)
        state.update(flat)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "PositionStats":
        check_state(state)
        if "touched" not in state:
            raise ValueError("a flattened state (no 'touched'): restore it with stats_from_state_dict")
        sketch_rows, reservoir, seed = (int(v) for v in state["settings"])
        shape = [int(s) for s in state["feature_shape"]]
        if len(shape) != 1:
            raise ValueError(f"per-position statistics hold (C,) rows, got feature_shape {shape}")
        out = cls(shape[0], sketch_rows, reservoir, seed, touched=float(state["touched"]))
        out.flat._fill(state)
        return out

    def merge(self, other: "PositionStats") -> None:
        """Adds other's statistics to these (other is not changed, nothing is shared)."""
        _check_mergeable(self, other)
        self.flat.merge(other.flat)

    def copy(self) -> "PositionStats":
        return PositionStats.from_state_dict(self.state_dict())


def stats_from_state_dict(state: dict):
    """`LayerStats` or `PositionStats` (a state with 'touched') from their `state_dict`."""
    return (PositionStats if "touched" in state else LayerStats).from_state_dict(state)


def _check_mergeable(mine, other) -> None:
    if type(other) is not type(mine):
        raise ValueError(f"cannot merge {type(other).__name__} into {type(mine).__name__} (flattened and "
                         "per-position statistics describe different rows)")
    if other.feature_shape != mine.feature_shape:
        raise ValueError(f"cannot merge stats of shapes {mine.feature_shape} and {other.feature_shape}")


def check_state(state: dict) -> None:
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
