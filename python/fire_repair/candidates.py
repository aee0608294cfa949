"""The grid that selection scores and the rule it chooses by, as one value: `Candidates`.

A candidate is (layer set, form, mode, tau quantile, alpha): the form is the estimator's that
scores it, the rest come from the grid. The defaults live on `select` and `select_unpaired`,
each with its evidence page.
"""
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from fire_kernels.modes import TAU_MODES

# evidence key -> sign (twin_kl, margin_gap and margin_gap_alpha: smaller wins)
TIE_BREAKS = {"twin_kl": -1.0, "margin": 1.0, "margin_gap": -1.0, "margin_gap_alpha": -1.0}
CLEAN_COSTS = ("clean_change", "expected_drop")

# one quantile, several (candidates), or a mapping {mode: one or several} naming every tau mode
Quantiles = Union[float, Sequence[float], Mapping[str, Union[float, Sequence[float]]]]


def tau_candidates(tau_quantile: Quantiles, modes) -> dict:
    """{mode: candidate clean quantiles of tau}: one float or a sequence for every mode, or a
    mapping that names every mode of `modes` that reads tau. Modes without tau get the single
    candidate None; duplicates are dropped in order. Raises ValueError for a tau mode the mapping
    does not name or a quantile outside [0, 1]."""
    if isinstance(tau_quantile, Mapping):
        missing = [m for m in modes if m not in tau_quantile and m in TAU_MODES]
        if missing:
            raise ValueError(f"tau_quantile names no quantile for the mode(s) {missing}")
        per_mode = {m: tau_quantile.get(m) for m in modes}
    else:
        per_mode = {m: tau_quantile for m in modes}
    out = {}
    for m, qs in per_mode.items():
        if m not in TAU_MODES:
            out[m] = (None,)
            continue
        qs = (qs,) if isinstance(qs, (int, float)) else tuple(qs)
        if not qs or any(not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"tau_quantile for {m!r} must be one or more values in [0, 1], got {qs!r}")
        out[m] = tuple(dict.fromkeys(float(q) for q in qs))
    return out


def fold_splits(n: int, folds: int, seed: int) -> list:
    """max(2, min(folds, n)) disjoint index tensors that cover range(n): a permutation seeded by
    `seed`, dealt round-robin. Raises ValueError for n < 2."""
    if n < 2:
        raise ValueError(f"selection needs at least 2 triggered samples to score out of fold, got {n}")
    folds = max(2, min(folds, n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i::folds] for i in range(folds)]


def check_slack(agreement_slack) -> None:
    """Raises ValueError unless `agreement_slack` is a whole number >= 0."""
    if not isinstance(agreement_slack, int) or agreement_slack < 0:
        raise ValueError(f"agreement_slack must be a whole number of samples >= 0, got {agreement_slack!r}")


def check_tie_break(tie_break, allowed=TIE_BREAKS) -> None:
    """Raises ValueError unless `tie_break` is one of `allowed`."""
    if tie_break not in allowed:
        raise ValueError(f"tie_break must be one of {sorted(allowed)}, got {tie_break!r}")


def check_grid(layer_sets, modes, alphas) -> None:
    """Raises ValueError unless there is at least one non-empty layer set, one mode and one alpha."""
    if not layer_sets or any(len(s) == 0 for s in layer_sets):
        raise ValueError("layer_sets must name at least one non-empty set of layers")
    if not modes:
        raise ValueError("modes must name at least one mode")
    if not alphas:
        raise ValueError("alphas must hold at least one value")


@dataclass(frozen=True)
class Candidates:
    """The candidates of one selection and the rule that chooses among them.

    layer_sets: the layer sets to try (None: each layer an estimator watches, alone).
    modes, alphas: tried at every layer set. tau_quantile: see `tau_candidates`.
    folds, seed: the out-of-fold split of the triggered samples (`fold_splits`).
    max_clean_change: the most a chosen repair may cost on the clean reference set, as measured
      by `clean_cost` (one of CLEAN_COSTS); max_class_cost: the most within one predicted class.
    tie_break: the evidence key (one of TIE_BREAKS) that orders candidates of equal agreement;
      agreement_slack: agreements within this many samples of the best qualifying one are equal.
    """
    layer_sets: Optional[Sequence[Sequence[str]]]
    modes: Sequence[str]
    alphas: Sequence[float]
    tau_quantile: Quantiles
    folds: int
    seed: int
    max_clean_change: float
    clean_cost: str
    tie_break: str
    agreement_slack: int
    max_class_cost: float = math.inf

    def validate(self, watched, n: int) -> tuple:
        """({mode: tau quantiles}, fold splits of n samples) after checking the clean limit, that
        every layer set names layers in `watched`, the tau quantiles, the folds, the clean cost,
        the tie-break and the slack, in that order. Raises ValueError on the first that fails."""
        limit = self.max_clean_change
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:  # NaN fails too
            raise ValueError(f"max_clean_change must be a number >= 0, got {limit!r}")
        if self.layer_sets is not None:
            unknown = sorted({name for s in self.layer_sets for name in s} - set(watched))
            if unknown:
                raise ValueError(f"layer_sets names layer(s) {unknown} that the estimator does not watch "
                                 f"(it watches {sorted(watched)})")
        quantiles = tau_candidates(self.tau_quantile, self.modes)
        splits = fold_splits(n, self.folds, self.seed)
        if self.clean_cost not in CLEAN_COSTS:
            raise ValueError(f"clean_cost must be one of {CLEAN_COSTS}, got {self.clean_cost!r}")
        check_tie_break(self.tie_break)
        check_slack(self.agreement_slack)
        return quantiles, splits

    def sets_for(self, layers) -> list:
        """The layer sets an estimator watching `layers` scores (each of its layers alone if the
        grid names none)."""
        if self.layer_sets is None:
            return [[name] for name in layers]
        return [s for s in self.layer_sets if set(s) <= set(layers)]

    def points(self, sets, quantiles: dict) -> list:
        """(layer set, mode, tau quantile, alpha) for every candidate at `sets`, in the order scored."""
        return [(layers, mode, q, alpha) for layers in sets for mode in self.modes for q in quantiles[mode]
                for alpha in self.alphas]
