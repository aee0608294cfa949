"""Out-of-fold scoring of every candidate of a `Candidates` grid, and a repair's clean cost.

`search` never scores a candidate on the samples its directions were estimated from: the
triggered samples are split into folds; for each fold a copy of each estimator observes the
other folds, and the candidate's repair is scored on this fold. What a score means (agreement
with twins, or moving flagged samples off a target) is the `Scoring`'s.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .attachment import attach, detach
from .candidates import Candidates, check_grid
from .estimate import Estimator
from .inference import logits, predict

MIN_CLASS_ROWS = 5  # a predicted class with fewer clean reference rows is no evidence of its own cost


def estimator_list(estimator) -> list:
    """One estimator, or a sequence of them, as a list."""
    return [estimator] if isinstance(estimator, Estimator) else list(estimator)


def worst_class(cost: torch.Tensor, pred: torch.Tensor) -> tuple:
    """(cost, class): the largest mean of the per-row `cost` within one predicted class `pred`,
    among the classes with at least MIN_CLASS_ROWS rows ((0.0, None) if none has)."""
    worst, which = 0.0, None
    for c in torch.unique(pred).tolist():
        rows = cost[pred == c]
        if len(rows) >= MIN_CLASS_ROWS and rows.mean().item() > worst:
            worst, which = rows.mean().item(), int(c)
    return worst, which


def clean_costs(pred: torch.Tensor, ref_pred: torch.Tensor, ref_prob: torch.Tensor) -> tuple:
    """Per clean reference row, (changed, drop): 1.0 where the repaired prediction `pred` differs
    from the unrepaired `ref_pred`, and p(ref_pred) - p(pred) under the unrepaired probabilities
    `ref_prob` (the accuracy lost if they were calibrated). Their means are the evidence's
    `clean_change` and `expected_drop`."""
    changed = (pred != ref_pred).float()
    drop = (ref_prob.gather(1, ref_pred[:, None]) - ref_prob.gather(1, pred[:, None]))[:, 0] \
        if len(pred) else changed
    return changed, drop


def clean_cost_evidence(pred: torch.Tensor, ref_pred: torch.Tensor, ref_prob: torch.Tensor, clean_cost: str) -> dict:
    """A repair's clean-cost evidence from its predictions `pred` on the clean reference set:
    the means of `clean_costs` (`clean_change`, `expected_drop`) and, by `clean_cost`, the
    `worst_class_cost` / `worst_class` (see `worst_class`)."""
    changed, drop = clean_costs(pred, ref_pred, ref_prob)
    per_row = changed if clean_cost == "clean_change" else drop
    worst, which = worst_class(per_row, ref_pred)
    return {"clean_change": changed.mean().item() if len(pred) else 0.0,
            "expected_drop": drop.mean().item() if len(pred) else 0.0, "worst_class_cost": worst, "worst_class": which}


def tau_kwargs(q) -> dict:
    """The profile's tau_quantile argument for a candidate (None: a mode without tau)."""
    return {} if q is None else {"tau_quantile": q}


@dataclass
class Scoring:
    """How the n triggered samples enter a search.

    observe(estimator, index): the estimator observes the samples at `index`.
    score(profile, index) -> (agreement summed over the samples at `index`, {evidence key: sum},
      their repaired predictions).
    source: the statistics a profile is built from (`Estimator.profile`'s `source`).
    adjust(agreement, predictions of all folds) -> agreement: a correction of the mean agreement.
    derive(entry): adds evidence computed from a candidate's per-sample means.
    """
    n: int
    observe: Callable
    score: Callable
    source: str = "auto"
    adjust: Optional[Callable] = None
    derive: Optional[Callable] = None


@dataclass
class Scored:
    """A search's evidence (one dict per candidate) and what a candidate's repair from all the
    triggered samples needs: the estimators that observed them (by form) and the clean reference."""
    evidence: list
    full: dict
    n_folds: int
    scoring: Scoring
    grid: Candidates
    model: torch.nn.Module
    clean_ref: torch.Tensor
    ref_pred: torch.Tensor
    ref_prob: torch.Tensor

    def profile(self, e: dict, with_fingerprint: bool = False):
        """Candidate `e`'s profile, estimated from all the triggered samples."""
        return self.full[e["form"]].profile(mode=e["mode"], alpha=e["alpha"], **tau_kwargs(e["tau_quantile"]),
                                            source=self.scoring.source, layers=e["layers"],
                                            with_fingerprint=with_fingerprint)

    def measure(self, e: dict) -> None:
        """Fills in candidate `e`'s clean costs on the clean reference set (see `clean_costs`) and
        its `worst_class_cost` / `worst_class` (see `worst_class`, by the grid's clean cost); a
        candidate that cannot be estimated gets its `error` and infinite costs."""
        try:
            profile = self.profile(e)
        except ValueError as err:
            e["error"] = str(err)
            e["clean_change"] = e["expected_drop"] = math.inf
            return
        attach(self.model, profile)
        try:
            pred = predict(self.model, self.clean_ref)
        finally:
            detach(self.model)
        e.update(clean_cost_evidence(pred, self.ref_pred, self.ref_prob, self.grid.clean_cost))


def _score_candidate(entry: dict, fold_estimators, splits, scoring: Scoring) -> None:
    """Fills in one candidate's out-of-fold agreement and evidence means, or its `error` where
    a fold cannot estimate it."""
    agree, extra, preds = 0.0, {}, []
    try:
        for est, held in zip(fold_estimators, splits, strict=True):
            profile = est.profile(mode=entry["mode"], alpha=entry["alpha"], **tau_kwargs(entry["tau_quantile"]),
                                  source=scoring.source, layers=list(entry["layers"]), with_fingerprint=False)
            a, sums, p = scoring.score(profile, held)
            agree += a
            for key, v in sums.items():
                extra[key] = extra.get(key, 0.0) + v
            preds.append(p)
    except ValueError as err:  # this candidate cannot be estimated from these samples
        entry["error"] = str(err)
        return
    n = scoring.n
    entry["agreement"] = agree / n if scoring.adjust is None else scoring.adjust(agree / n, torch.cat(preds))
    entry.update({key: v / n for key, v in extra.items()})
    if scoring.derive is not None:
        scoring.derive(entry)


def search(model, estimator, scoring: Scoring, grid: Candidates, clean_ref: torch.Tensor,
           reference: Optional[torch.Tensor] = None) -> Scored:
    """Scores every candidate of `grid` out of fold, for each estimator (one per form) on the
    layer sets it watches. `reference`: the unrepaired model's logits on `clean_ref` (computed
    if None). Clean costs are left None, for `Scored.measure`. Raises ValueError on an invalid
    grid, an empty `clean_ref`, or two estimators of one form."""
    estimators = estimator_list(estimator)
    if not estimators:
        raise ValueError("pass at least one estimator")
    if len(clean_ref) == 0:
        raise ValueError("x_clean_reference is empty: a repair's clean cost cannot be measured on no samples")
    n = scoring.n
    quantile, splits = grid.validate(set().union(*(e.layers for e in estimators)), n)
    if reference is None:
        reference = logits(model, clean_ref)
    ref_prob = torch.softmax(reference, 1) if len(reference) else reference
    ref_pred = reference.argmax(1) if len(reference) else torch.zeros(0, dtype=torch.int64)
    evidence, full_by_form = [], {}
    for base in estimators:
        sets = grid.sets_for(base.layers)  # a per-position estimator may watch fewer layers
        if grid.layer_sets is not None and not sets and len(estimators) > 1:
            continue
        check_grid(sets, grid.modes, grid.alphas)
        fold_estimators = []
        for held in splits:
            est = base.clone()
            keep = torch.ones(n, dtype=torch.bool)
            keep[held] = False
            scoring.observe(est, torch.nonzero(keep).flatten())
            fold_estimators.append(est)
        full = base.clone()
        scoring.observe(full, torch.arange(n))
        if base.form in full_by_form:
            raise ValueError(f"two estimators of the same form ({base.form}); pass one per form")
        full_by_form[base.form] = full
        for layers, mode, q, alpha in grid.points(sets, quantile):
            entry = {"layers": list(layers), "form": base.form, "mode": mode, "tau_quantile": q,
                     "alpha": float(alpha), "agreement": None, "margin": None, "clean_change": None,
                     "expected_drop": None}
            evidence.append(entry)
            _score_candidate(entry, fold_estimators, splits, scoring)
    return Scored(evidence=evidence, full=full_by_form, n_folds=len(splits), scoring=scoring, grid=grid,
                  model=model, clean_ref=clean_ref, ref_pred=ref_pred, ref_prob=ref_prob)
