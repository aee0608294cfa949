"""Label-free choice of the layer set, form, mode, tau and alpha of a repair, scored out of fold.

`select` (triggered samples with their clean twins) and `select_unpaired` (flagged triggered
samples, no twins) score every candidate of a `Candidates` grid out of fold (`search.search`),
then `choose` picks one. Their terms:

- Agreement. Paired: the share of triggered samples whose repaired prediction equals the
  unrepaired model's prediction on the clean twin. Unpaired: the share of flagged samples that
  the repair moves off the inferred target (the model's majority prediction on them), minus the
  total variation between their repaired class histogram and the model's prediction histogram
  on the clean reference set (the target left out).
- Clean cost, on the clean reference set, of the repair estimated from all the triggered
  samples: `clean_change` (the share of predictions it changes) and `expected_drop` (the mean of
  p(original prediction) - p(new prediction) under the unrepaired model); `clean_cost` names the
  one that `max_clean_change` limits.
- The choice: the highest agreement, compared at the resolution of one sample, among the
  candidates within the clean limits; agreements within `agreement_slack` samples of the best
  are ties, broken by the tie-break (paired default: the smaller `twin_kl`; unpaired default:
  the smaller `margin_gap_alpha`), then by the smaller clean cost, never by the order tried. If
  none qualifies, the least disruptive. Clean costs are measured down the ranking until a
  candidate qualifies; those that could not have won keep None ("-" in the table).
- A candidate that cannot be estimated is kept in the evidence with its `error` and never
  chosen; selection raises only if none can be.

Candidates may come from several estimators (one per form, on one model), so that the form is
chosen by the same criterion. Why each term: docs/method.md#label-free-selection and
docs/method.md#unpaired-selection.
"""
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .attachment import attach, detach
from .candidates import (
    CLEAN_COSTS,
    TIE_BREAKS,
    Candidates,
    Quantiles,
    check_slack,
    check_tie_break,
    fold_splits,
    tau_candidates,
)
from .estimate import Estimator
from .inference import logits, predict
from .search import MIN_CLASS_ROWS, Scored, Scoring, clean_costs, estimator_list, search, worst_class

__all__ = ["CLEAN_COSTS", "MIN_CLASS_ROWS", "TIE_BREAKS", "Candidates", "Quantiles", "Selection", "choose",
           "clean_costs", "fold_splits", "kl", "margin", "select", "select_unpaired", "tau_candidates", "worst_class"]


@dataclass
class Selection:
    """The chosen repair (`profile`, with the model's fingerprint and `info["selection"]`), what
    it is, and every candidate's `evidence` (one dict per candidate)."""
    profile: object
    layers: list
    mode: str
    alpha: float
    evidence: list = field(default_factory=list)  # one dict per candidate
    form: str = "flattened"
    tau_quantile: Optional[float] = None  # the clean quantile of tau (None: a mode without tau)

    def table(self) -> str:
        """Every candidate's evidence, one line each, the choice starred."""
        lines = ["layers | form | mode | tau_q | alpha | agreement | margin | clean_change | expected_drop"]
        chosen = (self.layers, self.form, self.mode, self.tau_quantile, self.alpha)
        for e in self.evidence:
            key = (e["layers"], e["form"], e["mode"], e.get("tau_quantile"), e["alpha"])
            mark = " *" if key == chosen else ""
            q = "-" if e.get("tau_quantile") is None else f"{e['tau_quantile']:g}"
            head = f"{'+'.join(e['layers'])} | {e['form']} | {e['mode']} | {q} | {e['alpha']:g} | "
            if "error" in e:
                lines.append(head + f"not estimable: {e['error']}")
                continue
            change, drop = ("-" if e.get(c) is None else f"{e[c]:.4f}" for c in CLEAN_COSTS)
            lines.append(head + f"{e['agreement']:.3f} | {e['margin']:.3f} | {change} | {drop}{mark}")
        return "\n".join(lines)


def margin(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the logit of `labels` minus the largest other logit."""
    own = out.gather(1, labels[:, None])[:, 0]
    others = out.scatter(1, labels[:, None], float("-inf")).amax(1)
    return own - others


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL(softmax(p) || softmax(q)), in nats."""
    lp, lq = torch.log_softmax(p_logits.float(), 1), torch.log_softmax(q_logits.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def choose(evidence: list, max_clean_change: float, measure=None, n: int = None, tie: str = "margin",
           cost: str = "clean_change", slack: int = 0, max_class_cost: float = math.inf) -> dict:
    """The candidate with the highest (agreement, tie-break) among those whose clean cost (the
    evidence key `cost`: "clean_change" or "expected_drop") is at most `max_clean_change`, ties
    to the smaller cost; if none qualifies, the least disruptive. Candidates with an `error` are
    never chosen.

    tie: the evidence key that breaks ties (TIE_BREAKS gives its sign: "margin" larger wins,
      "twin_kl", "margin_gap" and "margin_gap_alpha" smaller wins).
    n: the number of triggered samples scored; with it agreements are compared at the resolution
      of one sample (a smaller difference is no evidence, and the tie-break decides).
    slack (with n): every candidate within `slack` samples of the best qualifying agreement counts
      as equal to it, and the tie-break alone orders them.
    measure(e): fills in a candidate's clean costs where they are None. Candidates are measured
      in order of (agreement, tie-break), so only those that could win are measured; the choice
      is the one measuring all of them would give.
    max_class_cost: a candidate also needs `worst_class_cost` (its clean cost within the predicted
      class it costs most, see `worst_class`) at most this.
    """
    def clean_cost(e):
        if e[cost] is None:
            measure(e)
        return e[cost]

    evidence = [e for e in evidence if "error" not in e]  # candidates that could not be estimated
    sign = TIE_BREAKS[tie]

    def rank(e):
        return (round(e["agreement"] * n) if n else e["agreement"]), sign * e[tie]

    ranked = sorted(evidence, key=lambda e: tuple(-v for v in rank(e)))
    qualifies = lambda e: clean_cost(e) <= max_clean_change and e.get("worst_class_cost", 0.0) <= max_class_cost  # noqa: E731,E501
    # the best agreement a qualifying candidate reaches (measured down the ranking), then the
    # tie-break over every candidate within `slack` samples of it (slack 0: that agreement only;
    # the ones ranked above it were measured and refused)
    top = next((rank(e)[0] for e in ranked if qualifies(e)), None)
    if top is None:  # nothing keeps clean predictions (every candidate measured by now): the least disruptive
        return min(evidence, key=lambda e: (e[cost], -e["agreement"], -sign * e[tie]))
    near = sorted((e for e in ranked if rank(e)[0] >= top - (slack if n else 0)), key=lambda e: -rank(e)[1])
    first = next(e for e in near if qualifies(e))
    return min((e for e in near if rank(e)[1] == rank(first)[1] and qualifies(e)), key=lambda e: e[cost])


def _model_of(estimator) -> torch.nn.Module:
    """The one model that the estimator(s) observe."""
    estimators = estimator_list(estimator)
    if not estimators:
        raise ValueError("pass at least one estimator")
    if any(e.model is not estimators[0].model for e in estimators):
        raise ValueError("the estimators must observe the same model object")
    return estimators[0].model


def _scored(model, profile, x):
    """The model's logits on x with `profile` attached."""
    attach(model, profile)
    try:
        return logits(model, x)
    finally:
        detach(model)


def _chosen(scored: Scored, criterion: str) -> Selection:
    """`choose` over a search's evidence; the chosen repair estimated from all the samples."""
    evidence, grid = scored.evidence, scored.grid
    if all("error" in e for e in evidence):
        raise ValueError(f"no candidate could be estimated from these samples: {evidence[0]['error']}")
    e = choose(evidence, grid.max_clean_change, scored.measure, scored.scoring.n, grid.tie_break, grid.clean_cost,
               grid.agreement_slack, grid.max_class_cost)
    if "error" in e:
        raise ValueError(f"no candidate could be estimated from all the samples: {e['error']}")
    profile = scored.profile(e, with_fingerprint=True)
    slack = grid.agreement_slack
    within = f" (agreements within {slack} sample(s) of the best are ties)" if slack else ""
    profile.info["selection"] = {"criterion": f"{criterion}, out of {scored.n_folds} folds, s.t. {grid.clean_cost} "
                                              f"<= {grid.max_clean_change:g}; ties: {grid.tie_break}{within}",
                                 "chosen": e, "candidates": evidence}
    return Selection(profile=profile, layers=e["layers"], mode=e["mode"], alpha=e["alpha"], evidence=evidence,
                     form=e["form"], tau_quantile=e["tau_quantile"])


@torch.no_grad()
def select(estimator: Union[Estimator, Sequence[Estimator]], x_clean: torch.Tensor, x_poisoned: torch.Tensor,
           layer_sets: Sequence[Sequence[str]] = None, modes: Sequence[str] = ("clamp",),
           alphas: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0), max_clean_change: float = 0.01,
           tau_quantile: Quantiles = 0.99, source: str = "auto", folds: int = 4,
           x_clean_reference: Optional[torch.Tensor] = None, seed: int = 0,
           tie_break: str = "twin_kl", clean_cost: str = "expected_drop", agreement_slack: int = 1,
           max_class_cost: float = math.inf) -> Selection:
    """Paired selection: the candidate whose repaired triggered samples agree most, out of fold,
    with the unrepaired model's predictions on their clean twins, within the clean limits.

    estimator: one estimator, or one per form on one model, holding what was observed besides
      these pairs (typically a clean held-out set); it is not changed. Warns (DeprecationWarning)
      where it has already observed pairs: they would be counted in every fold.
    x_clean, x_poisoned: the pairs (x_clean[i] is x_poisoned[i] without the trigger), observed
      here fold by fold.
    layer_sets: the candidate layer sets (None: each watched layer alone); modes and alphas are
      tried at each (evidence: docs/method.md#alphas, docs/method.md#modes).
    tau_quantile: the candidate clean quantile(s) of tau (see `tau_candidates`), chosen per
      candidate like alpha (`Selection.tau_quantile`) (evidence: docs/method.md#tau-quantiles).
    max_clean_change, clean_cost: the chosen repair's clean cost on `x_clean_reference` (default:
      x_clean), "expected_drop" or "clean_change", is at most this (evidence:
      docs/method.md#max-clean-change); max_class_cost: the same within any one predicted class.
    folds, seed: the out-of-fold split (evidence: docs/method.md#folds).
    tie_break: "twin_kl" (the smaller mean KL divergence from the twin's output distribution to
      the repaired one) or "margin" (the larger mean logit margin of the twin's class); both are
      in the evidence (evidence: docs/method.md#tie-break).
    agreement_slack: agreements within this many twins of the best qualifying one are ties,
      ordered by the tie-break alone (evidence: docs/method.md#agreement-slack).
    source: the statistics each profile is built from (`Estimator.profile`).

    Raises ValueError on invalid arguments, pairs of unequal shapes, or where no candidate can be
    estimated."""
    check_tie_break(tie_break)
    check_slack(agreement_slack)
    model = _model_of(estimator)
    if x_clean.shape != x_poisoned.shape:
        raise ValueError(f"pairs must have equal shapes, got {tuple(x_clean.shape)} and {tuple(x_poisoned.shape)}")
    if any(st.n_pairs for est in estimator_list(estimator) for st in est.stats.values()):
        warnings.warn("select() estimates from the pairs it is given, fold by fold; this estimator has already "
                      "observed pairs, so they are counted in every fold. Pass an estimator without pairs.",
                      DeprecationWarning, stacklevel=2)
    scoring = _paired_scoring(model, x_clean, x_poisoned, source)
    clean_ref = x_clean if x_clean_reference is None else x_clean_reference
    grid = Candidates(layer_sets, modes, alphas, tau_quantile, folds, seed, max_clean_change, clean_cost, tie_break,
                      agreement_slack, max_class_cost)
    return _chosen(search(model, estimator, scoring, grid, clean_ref), "max agreement with the clean twins")


def _paired_scoring(model, x_clean, x_poisoned, source: str) -> Scoring:
    """Agreement of the repaired x_poisoned with the unrepaired predictions on their twins
    x_clean; evidence `margin` (of the twin's class) and `twin_kl`."""
    twin_logits = logits(model, x_clean)
    twin = twin_logits.argmax(1) if len(x_clean) else torch.zeros(0, dtype=torch.int64)

    def observe(est, idx):
        est.observe_pairs(x_clean[idx], x_poisoned[idx])

    def score(profile, held):
        out = _scored(model, profile, x_poisoned[held])
        pred = out.argmax(1)
        sums = {"margin": margin(out, twin[held]).sum().item(), "twin_kl": kl(twin_logits[held], out).sum().item()}
        return (pred == twin[held]).sum().item(), sums, pred

    return Scoring(len(x_clean), observe, score, source)


@torch.no_grad()
def select_unpaired(estimator: Union[Estimator, Sequence[Estimator]], x_flagged: torch.Tensor,
                    x_clean_reference: torch.Tensor, layer_sets: Sequence[Sequence[str]] = None,
                    modes: Sequence[str] = ("clamp",), alphas: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0),
                    max_clean_change: float = 0.01, tau_quantile: Quantiles = 0.99,
                    folds: int = 4, seed: int = 0, clean_cost: str = "expected_drop",
                    agreement_slack: int = 2, tie_break: str = "margin_gap_alpha",
                    alpha_weight: float = 0.5, max_class_cost: float = math.inf) -> Selection:
    """Unpaired selection: the candidate that moves most held-out flagged samples off the inferred
    target, toward the clean class histogram, within the clean limits.

    estimator: holds clean statistics (one, or one per form on one model); the flagged
      (triggered) samples `x_flagged` are observed here, fold by fold. The target is the model's
      majority prediction on them; warns where fewer than half are predicted as it (no backdoor
      to measure a repair by; evidence: docs/method.md#unpaired-selection).
    x_clean_reference: where the clean cost is measured (the whole clean set, the target class
      included: a repair must not move those images either).
    layer_sets, modes, folds, seed, max_clean_change, clean_cost, max_class_cost: as in `select`.
    alphas: the coarser grid (evidence: docs/method.md#unpaired-alphas).
    tau_quantile: one quantile per mode; offered several, this criterion prefers the lower (evidence:
      docs/method.md#unpaired-tau).
    agreement_slack: agreements within this many flagged samples of the best qualifying one are
      ties, ordered by `tie_break`:
      "margin_gap_alpha" (default): "margin_gap" plus `alpha_weight` x alpha, so that among
        near-ties the gentler repair wins;
      "margin_gap": how far the repaired flagged samples' mean margin (largest logit minus the
        next) lies from the unrepaired model's mean margin on the clean reference set;
      "margin": the larger mean margin (evidence for all three: docs/method.md#unpaired-tie-break).

    The profile's info["selection"] also records `inferred_target`, `target_share` and
    `clean_margin`. Raises ValueError on invalid arguments, or where no candidate can be
    estimated."""
    check_slack(agreement_slack)
    if tie_break not in ("margin_gap_alpha", "margin_gap", "margin"):
        raise ValueError(f"tie_break must be 'margin_gap_alpha', 'margin_gap' or 'margin', got {tie_break!r}")
    if not (isinstance(alpha_weight, (int, float)) and math.isfinite(alpha_weight) and alpha_weight >= 0):
        raise ValueError(f"alpha_weight must be a finite number >= 0, got {alpha_weight!r}")
    model = _model_of(estimator)
    flagged_pred = predict(model, x_flagged)
    target = int(flagged_pred.mode().values) if len(x_flagged) else 0
    target_share = (flagged_pred == target).double().mean().item() if len(x_flagged) else 0.0
    if len(x_flagged) and target_share < 0.5:
        # "moved off the target" would then score moving correctly read images (docs/method.md#unpaired-selection)
        warnings.warn(f"only {100 * target_share:.0f}% of the flagged samples are predicted as the inferred "
                      f"target {target}: they show no backdoor for unpaired selection to measure a repair by "
                      "(is the attack implanted, are the samples triggered?)", stacklevel=3)
    clean_logits = logits(model, x_clean_reference)
    scoring, clean_margin = _unpaired_scoring(model, x_flagged, target, clean_logits, alpha_weight)
    grid = Candidates(layer_sets, modes, alphas, tau_quantile, folds, seed, max_clean_change, clean_cost, tie_break,
                      agreement_slack, max_class_cost)
    sel = _chosen(search(model, estimator, scoring, grid, x_clean_reference, reference=clean_logits),
                  f"max share of flagged samples moved off the inferred target {target} minus the total variation "
                  "between their repaired class histogram and the clean one")
    sel.profile.info["selection"]["inferred_target"] = target
    sel.profile.info["selection"]["target_share"] = target_share
    sel.profile.info["selection"]["clean_margin"] = clean_margin
    return sel


def _unpaired_scoring(model, x_flagged, target: int, clean_logits, alpha_weight: float) -> tuple:
    """(Scoring, the unrepaired mean margin on the clean reference): the share of repaired
    x_flagged moved off `target` minus the total variation between their class histogram and
    the clean one (target left out); evidence `margin`, `margin_gap`, `margin_gap_alpha`."""
    clean_pred = clean_logits.argmax(1) if len(clean_logits) else torch.zeros(0, dtype=torch.int64)
    clean_margin = margin(clean_logits, clean_pred).mean().item() if len(clean_logits) else 0.0
    n_classes = int(max(clean_pred.max().item() if len(clean_pred) else 0, target)) + 1

    def histogram(pred):
        h = torch.bincount(pred[pred != target], minlength=n_classes).double()
        return h / h.sum().clamp_min(1)

    clean_hist = histogram(clean_pred)

    def observe(est, idx):
        est.observe(x_flagged[idx], poisoned=True)

    def score(profile, held):
        out = _scored(model, profile, x_flagged[held])
        pred = out.argmax(1)
        return (pred != target).sum().item(), {"margin": margin(out, pred).sum().item()}, pred

    def adjust(off_target, preds):
        h = histogram(preds)
        if len(h) > len(clean_hist):  # a class the clean set never predicts
            return off_target - 1.0
        return off_target - 0.5 * float((h - clean_hist[: len(h)]).abs().sum() + clean_hist[len(h):].sum())

    def derive_gaps(e):  # the tie-break keys: the margin gap, alone and with the alpha weighed in
        e["margin_gap"] = abs(e["margin"] - clean_margin)
        e["margin_gap_alpha"] = e["margin_gap"] + alpha_weight * e["alpha"]

    scoring = Scoring(len(x_flagged), observe, score, "unpaired", adjust=adjust, derive=derive_gaps)
    return scoring, clean_margin
