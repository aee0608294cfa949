"""The recommended recipe in one call: `fit(model, clean=..., pairs=... | flagged=...)`.

It finds candidate layers in the model's structure (or takes the ones named), builds a
flattened estimator and, where layers have positions, a per-position one, observes the clean
images, and lets label-free selection (`select` with pairs, `select_unpaired` with flagged
images only) choose the layers, form, mode, tau and alpha out of fold. The defaults are the
recipe the evaluation suite measures; the evidence for each is in
docs/method.md#defaults-and-their-evidence.
"""
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .attachment import attached
from .estimate import Estimator
from .inference import eval_mode, logits, predict
from .outputs import hidden_state
from .profile import Profile
from .search import clean_cost_evidence
from .selection import Selection, choose, kl, select, select_unpaired, tau_candidates
from .smoothing import calibrate as calibrate_smoothing

FORMS = ("flattened", "per_position")
PAIRED_MODES = ("clamp", "gated", "invert")
UNPAIRED_MODES = PAIRED_MODES  # unpaired invert takes its slope from the flagged rows' spread (flattened only)


@dataclass
class FitConfig:
    """Every knob of the recipe; the defaults are the recommended recipe, the evidence for each
    on the page named (all of them: docs/method.md#defaults-and-their-evidence).

    layers: candidate layers (None: `candidate_layers(model, example)`, at most `max_layers`).
    layer_pairs: also offer each two consecutive candidate layers together.
    forms: the repair forms offered ("flattened", "per_position"; per position only at layers
      with positions) (evidence: docs/method.md#forms). channel_dim: where a layer's channels sit
      for the per-position form (1: (N, C, ...) maps, -1: (N, T, C) tokens; None: -1 if a
      candidate returns 3-d tokens, else 1).
    modes: None: clamp, gated and invert, with pairs or without (unpaired, invert only
      flattened) (evidence: docs/method.md#modes, docs/method.md#unpaired-invert).
    alphas / unpaired_alphas: the alpha grid with pairs / with flagged images only (evidence:
      docs/method.md#alphas, docs/method.md#unpaired-alphas).
    tau_quantile, gate_quantile, invert_quantile: clean-quantile candidates of tau for clamp,
      gated and invert (evidence: docs/method.md#tau-quantiles, docs/method.md#gate-quantile,
      docs/method.md#invert-quantiles); unpaired: the highest candidate of each mode only
      (evidence: docs/method.md#unpaired-tau).
    k: directions per layer (`Estimator`; evidence: docs/method.md#k). paired_beta: `Estimator`'s
      (evidence: docs/method.md#paired-beta). folds, seed: the out-of-fold split of `select`
      (evidence: docs/method.md#folds).
    max_clean_change, clean_cost: the clean cost a chosen repair may have on the clean images
      (evidence: docs/method.md#max-clean-change).
    max_class_cost: the clean cost it may have within any one predicted class, so that a repair
      that wrecks one class is refused even where the mean hides it (a guard, not a measured value).
    min_coverage: warn where the clean images' predicted classes cover less than this share of
      the model's outputs (the clean cost cannot see the classes it never saw; a guard).
    tie_break, agreement_slack: paired selection's (evidence: docs/method.md#tie-break,
      docs/method.md#agreement-slack); unpaired selection keeps `select_unpaired`'s (evidence:
      docs/method.md#unpaired-tie-break).
    match_clean: unpaired: leave the inferred target class out of the clean set the directions
      are estimated against, since triggered images never come from it (evidence:
      docs/method.md#match-clean).
    smoothing, smoothing_quantile: where the chosen repair is per position on images, offer gated
      input smoothing (`fire_repair.Smoothing`, its gate the clean positions'
      `smoothing_quantile`) as `offer_smoothing` says: paired, every per-position candidate of
      the chosen mode smoothed at each layer of its set competes with the choice by `choose`'s
      rule on the pairs; unpaired, the choice smoothed against it unsmoothed (evidence:
      docs/method.md#gated-smoothing).
    batch: the batch size of the model's forward passes here.
    """
    layers: Optional[Sequence[str]] = None
    max_layers: int = 8
    layer_pairs: bool = True
    forms: Sequence[str] = FORMS
    channel_dim: Optional[int] = None
    modes: Optional[Sequence[str]] = None
    alphas: Sequence[float] = (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
    unpaired_alphas: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0)
    tau_quantile: Sequence[float] = (0.9, 0.99)
    gate_quantile: Sequence[float] = (0.999,)
    invert_quantile: Sequence[float] = (0.99, 0.999)
    k: int = 1
    folds: int = 4
    seed: int = 0
    paired_beta: str = "control_variate"
    max_clean_change: float = 0.01
    clean_cost: str = "expected_drop"
    max_class_cost: float = 0.1
    min_coverage: float = 0.5
    tie_break: str = "twin_kl"
    agreement_slack: int = 1
    match_clean: bool = True
    smoothing: bool = True
    smoothing_quantile: float = 0.9999
    batch: int = 256

    def tau_candidates(self, modes) -> dict:
        """{mode: candidate clean quantiles of tau} for `modes` (None for modes without tau)."""
        return tau_candidates({"clamp": self.tau_quantile, "gated": self.gate_quantile,
                               "invert": self.invert_quantile}, modes)


@dataclass
class Fit:
    """What `fit` returns: the chosen `profile` (attach it, save it), the `selection` with every
    candidate's evidence, what the clean images `coverage` holds, and the layers offered."""
    profile: Profile
    selection: Selection
    coverage: dict
    layers: list
    paired: bool
    config: FitConfig = field(repr=False, default=None)

    @property
    def choice(self) -> dict:
        """The chosen layers, form, mode, tau quantile, alpha and smoothing (its layer and gate
        quantile, or None)."""
        s = self.selection
        smoothing = self.profile.smoothing
        return {"layers": s.layers, "form": s.form, "mode": s.mode, "tau_quantile": s.tau_quantile, "alpha": s.alpha,
                "smoothing": None if smoothing is None else {"layer": smoothing.layer, "quantile": smoothing.quantile}}

    def table(self) -> str:
        """Every candidate's evidence (the choice starred), after a line on the clean coverage."""
        c = self.coverage
        head = (f"clean images: {c['n_clean']}, predicted classes {c['n_seen']} of {c['n_outputs']} outputs"
                f"{' (thin: the clean cost cannot see the others)' if c['thin'] else ''}")
        return head + "\n" + self.selection.table()


def _layer_outputs(model, example) -> dict:
    """{module name: its hidden-state output} for one eval-mode forward of `example`, in the order
    the modules finished; modules whose output FIRE cannot read map to None."""
    outs = {}

    def hook(name):
        def record(mod, inp, out):
            try:
                outs[name] = hidden_state(out, name)
            except TypeError:
                outs[name] = None
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with eval_mode(model), torch.no_grad():
            final = model(example)
    finally:
        for h in handles:
            h.remove()
    outs[""] = final
    return outs


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def candidate_layers(model: torch.nn.Module, example: torch.Tensor, max_layers: int = 8) -> list:
    """Candidate layers for FIRE found in the model's structure, shallow to deep: the outputs of
    its stages or blocks. Starting from the model's children, a child that holds more than half
    of the parameters and has at least two children with parameters is replaced by its
    children (a backbone by its stages, a stage list by its blocks), until no child is. Kept:
    modules that ran on `example`, have parameters, return a float tensor with the batch
    dimension (or a tuple / ModelOutput around one) and are not the model's output; first, the
    model's input where an identity exposes it (`fr.with_input_layer`); at most `max_layers`,
    spread evenly from the first to the last."""
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    outs = _layer_outputs(model, example)
    modules = dict(model.named_modules())

    def children(name):
        """The modules under `name` one level down, looking through containers that never ran
        themselves (a ModuleList, or a Sequential whose children the parent calls)."""
        kids = []
        for child, _ in modules[name].named_children():
            full = f"{name}.{child}" if name else child
            kids += [full] if full in outs else children(full)
        return kids

    frontier = children("")
    while True:
        total = sum(_n_params(modules[n]) for n in frontier)
        big = [n for n in frontier if sum(_n_params(modules[c]) > 0 for c in children(n)) >= 2
               and _n_params(modules[n]) > total / 2]
        if not big:
            break
        i = frontier.index(big[0])
        frontier[i:i + 1] = children(big[0])
    final, n = outs[""], example.shape[0]
    try:  # the model's output tensor (its logits), which is not a candidate
        final = hidden_state(final, "")
    except TypeError:
        final = None

    def usable(name):
        h = outs.get(name)
        return (h is not None and h.is_floating_point() and h.dim() >= 2 and h.shape[0] == n
                and _n_params(modules[name]) > 0
                and h is not final)

    found = [name for name in frontier if usable(name)]
    # the model's input as a layer: a parameter-free module whose output is the input itself
    # (`with_input_layer`'s identity); where blends and patches are often best undone
    found = [name for name, h in outs.items() if name and h is example and _n_params(modules[name]) == 0][:1] + found
    if not found:
        raise ValueError("no candidate layer found in the model's structure (modules with parameters returning a "
                         "batch of float features); name the layers to repair")
    if len(found) > max_layers:
        picks = sorted({round(i * (len(found) - 1) / (max_layers - 1)) for i in range(max_layers)}) \
            if max_layers > 1 else [len(found) - 1]
        found = [found[i] for i in picks]
    return found


def positional_layers(model, layers, example, channel_dim: int) -> list:
    """The layers among `layers` whose outputs have positions laid out as `channel_dim` says:
    (N, C, ...) with at least one position dim for channel_dim 1, (N, T, C) tokens for -1."""
    outs = _layer_outputs(model, example)
    missing = [name for name in layers if name not in outs]
    if missing:
        raise ValueError(f"layer(s) {missing} did not run on the example (or the model has no such module)")
    dims = {name: (outs[name].dim() if isinstance(outs[name], torch.Tensor) else 0) for name in layers}
    return [name for name in layers if (dims[name] == 3 if channel_dim == -1 else dims[name] >= 3)]


def _infer_channel_dim(model, layers, example) -> int:
    outs = _layer_outputs(model, example)
    return -1 if any(isinstance(outs.get(n), torch.Tensor) and outs[n].dim() == 3 for n in layers) else 1


def coverage(model, x_clean, batch: int = 256) -> dict:
    """What the clean images cover: the classes the model predicts on them against its number
    of outputs."""
    if x_clean.shape[0] == 0:
        raise ValueError("the clean images are empty: fit needs them to calibrate and to measure the clean cost")
    out = logits(model, x_clean, batch)
    n_outputs, pred = out.shape[-1], out.argmax(1)
    seen = torch.unique(pred).tolist()
    return {"n_clean": int(x_clean.shape[0]), "n_outputs": int(n_outputs), "n_seen": len(seen), "classes": seen,
            "counts": torch.bincount(pred, minlength=n_outputs).tolist()}


def estimators(model, layers, config: FitConfig, example) -> list:
    """One estimator per form of config.forms (per position: only the layers with positions)."""
    channel_dim = config.channel_dim if config.channel_dim is not None else _infer_channel_dim(model, layers, example)
    out = []
    for form in config.forms:
        if form not in FORMS:
            raise ValueError(f"forms must be among {FORMS}, got {form!r}")
        watch = positional_layers(model, layers, example, channel_dim) if form == "per_position" else list(layers)
        if watch:
            out.append(Estimator(model, watch, k=config.k, seed=config.seed, per_position=form == "per_position",
                                 channel_dim=channel_dim, paired_beta=config.paired_beta))
    if not out:
        raise ValueError(f"no layer of {list(layers)} can be repaired in the forms {list(config.forms)}")
    return out


def matched_clean(model, x_clean, x_flagged, batch: int = 256):
    """(clean images, inferred target): the clean images less those the model assigns to the
    target it predicts for most flagged images (no labels). Triggered images never come from
    the target class, so leaving it out keeps a content difference out of the direction."""
    target = int(predict(model, x_flagged, batch).mode().values)
    return x_clean[predict(model, x_clean, batch) != target], target


def layer_sets(layers, pairs: bool) -> list:
    """Each layer alone and, with `pairs`, each two consecutive layers together."""
    sets = [[name] for name in layers]
    return sets + ([list(p) for p in zip(layers[:-1], layers[1:], strict=True)] if pairs else [])


@torch.no_grad()
def fit(model: torch.nn.Module, clean: torch.Tensor, pairs: Optional[tuple] = None,
        flagged: Optional[torch.Tensor] = None, config: Optional[FitConfig] = None,
        sets: Optional[Sequence[Sequence[str]]] = None, **overrides) -> Fit:
    """Runs the recommended recipe and returns the chosen repair with its evidence.

    model: the (backdoored) model; it is run in eval mode and left as it was.
    clean: clean images the defender holds (calibration of centre and tau, the clean cost).
    pairs: (x, x_triggered), the same images without and with the trigger (paired FIRE), or
    flagged: triggered images with no twins (unpaired FIRE). Exactly one of the two.
    config / overrides: a FitConfig, or its fields as keywords (`fit(..., k=2, folds=8)`).
    sets: the candidate layer sets themselves (overrides layers and layer_pairs).

    Warns where the clean images' predicted classes cover less than `min_coverage` of the
    model's outputs. Raises ValueError on missing or inconsistent data.
    """
    config = replace(config or FitConfig(), **overrides)
    if (pairs is None) == (flagged is None):
        raise ValueError("pass exactly one of pairs=(x, x_triggered) (paired) or flagged=x_triggered (unpaired)")
    if not isinstance(clean, torch.Tensor) or clean.dim() < 2:
        raise ValueError("clean must be a batch of inputs (a tensor with a batch dimension)")
    paired = pairs is not None
    if paired:
        if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
            raise ValueError("pairs must be (x, x_triggered)")
        x, x_trig = pairs
        if x.shape != x_trig.shape:
            raise ValueError(f"pairs must have equal shapes, got {tuple(x.shape)} and {tuple(x_trig.shape)}")
        if x.shape[1:] != clean.shape[1:]:
            raise ValueError(f"pairs hold inputs of shape {tuple(x.shape[1:])}, clean {tuple(clean.shape[1:])}")
    elif flagged.shape[1:] != clean.shape[1:]:
        raise ValueError(f"flagged holds inputs of shape {tuple(flagged.shape[1:])}, clean {tuple(clean.shape[1:])}")
    cov = coverage(model, clean, config.batch)
    cov["thin"] = cov["n_seen"] < config.min_coverage * cov["n_outputs"]
    if cov["thin"]:
        warnings.warn(f"the clean images are predicted as {cov['n_seen']} of the model's {cov['n_outputs']} classes: "
                      "the clean cost cannot see what a repair does to the others. Pass clean images that cover the "
                      "classes the model serves.", stacklevel=3)  # the caller of fit (under no_grad's wrapper)
    example = clean[:2]
    explicit = sets is not None
    if sets is None:
        layers = list(config.layers) if config.layers else candidate_layers(model, example, config.max_layers)
        sets = layer_sets(layers, config.layer_pairs)
    else:
        sets = [list(s) for s in sets]
        layers = list(dict.fromkeys(name for s in sets for name in s))
    modes = tuple(config.modes) if config.modes else (PAIRED_MODES if paired else UNPAIRED_MODES)
    ests = estimators(model, layers, config, example)
    if not explicit:  # a found or named layer that no form offered can repair (fc, per position only) is no candidate
        sets = [s for s in sets if any(set(s) <= set(e.layers) for e in ests)]
    grid = dict(layer_sets=sets, modes=list(modes), max_clean_change=config.max_clean_change,
                clean_cost=config.clean_cost, folds=config.folds, seed=config.seed,
                max_class_cost=config.max_class_cost)
    quantiles = config.tau_candidates(modes)
    if paired:
        for est in ests:
            est.observe(clean, poisoned=False)
        sel = select(ests, *pairs, x_clean_reference=clean, alphas=list(config.alphas), tau_quantile=quantiles,
                     tie_break=config.tie_break, agreement_slack=config.agreement_slack, **grid)
    else:
        ref = matched_clean(model, clean, flagged, config.batch)[0] if config.match_clean and len(flagged) else clean
        for est in ests:
            est.observe(ref, poisoned=False)
        # one tau per mode, the most conservative candidate (docs/method.md#unpaired-tau)
        grid["tau_quantile"] = {m: max(q) for m, q in quantiles.items()}
        sel = select_unpaired(ests, flagged, clean, alphas=list(config.unpaired_alphas), **grid)
    if config.smoothing:
        est = next((e for e in ests if e.form == sel.form), None)
        offer_smoothing(model, sel, clean, config, estimator=est, sets=sets, pairs=pairs, flagged=flagged)
    sel.profile.info["coverage"] = {k: v for k, v in cov.items() if k != "counts"}
    if math.isfinite(config.max_class_cost):
        sel.profile.info["selection"]["max_class_cost"] = config.max_class_cost
    return Fit(profile=sel.profile, selection=sel, coverage=cov, layers=layers, paired=paired, config=config)


def _evidence(model, profile, clean, ref, config, pairs, flagged, target, with_costs: bool = True) -> dict:
    """The label-free evidence of `profile` (with its smoothing, if any) on the triggered samples:
    paired, `agreement` with the twins and `twin_kl`; unpaired, the share moved off `target` and
    the target's mean probability (`target_probability`); with_costs, its clean costs too."""
    with attached(model, profile):
        if pairs is not None:
            out = logits(model, pairs[1], config.batch)
            twin = ref["twin"]
            e = {"agreement": (out.argmax(1) == twin.argmax(1)).float().mean().item(),
                 "twin_kl": kl(out, twin).mean().item()}
        else:
            out = logits(model, flagged, config.batch)
            e = {"agreement": (out.argmax(1) != target).float().mean().item(),
                 "target_probability": torch.softmax(out.float(), 1)[:, target].mean().item()}
        if with_costs:
            e.update(_clean_costs(model, clean, ref, config))
    return e


def _clean_costs(model, clean, ref, config) -> dict:
    """The clean-cost evidence of the repair attached to `model` (`search.clean_cost_evidence`)."""
    return clean_cost_evidence(predict(model, clean, config.batch), ref["pred"], ref["prob"], config.clean_cost)


@torch.no_grad()
def offer_smoothing(model, sel: Selection, clean, config: FitConfig, estimator=None, sets=None, pairs=None,
                    flagged=None) -> None:
    """Offers gated input smoothing (`fire_repair.Smoothing`) where the chosen repair is per
    position on images, and replaces `sel.profile` by the winner where a smoothed repair wins;
    the comparison is recorded in the winner's `info["smoothing"]`.

    Paired: the chosen repair competes with every per-position candidate of its mode (each layer
    set of `sets` that `estimator`, the per-position estimator, watches; each tau and alpha of
    the grid; estimated from all the pairs) smoothed at each layer of its set, by `choose`'s rule
    (agreement with the twins within the slack, then twin_kl, within the clean limits), on the
    pairs. Unpaired: the chosen repair smoothed at each layer of its set against it unsmoothed
    (more flagged samples off the target, then a lower target probability, within the clean
    limits). Each smoothing layer's gate is the clean positions' `smoothing_quantile`."""
    profile = sel.profile
    if clean.dim() != 4 or sel.form != "per_position" or any(lp.channel_dim != 1 for lp in profile.layers):
        return
    with eval_mode(model):
        ref_logits = logits(model, clean, config.batch)
        ref = {"pred": ref_logits.argmax(1), "prob": torch.softmax(ref_logits.float(), 1),
               "twin": logits(model, pairs[0], config.batch) if pairs is not None else None}
        target = None if pairs is not None else int(predict(model, flagged, config.batch).mode().values)
        args = (clean, ref, config, pairs, flagged, target)
        chosen = {"layers": list(sel.layers), "tau_quantile": sel.tau_quantile, "alpha": sel.alpha,
                  "smoothing_layer": None, **_evidence(model, profile, *args)}
        if pairs is None:
            repairs = {(tuple(sel.layers), sel.tau_quantile, sel.alpha): profile}
        else:
            full = estimator.clone()
            full.observe_pairs(*pairs)
            taus = config.tau_candidates([sel.mode])[sel.mode]
            repairs = {(tuple(s), q, a): None for s in sets if set(s) <= set(full.layers) for q in taus
                       for a in config.alphas}

        def repair(key):
            if repairs[key] is None:
                layers, q, a = key
                repairs[key] = full.profile(mode=sel.mode, alpha=a, layers=list(layers), with_fingerprint=True,
                                            **({} if q is None else {"tau_quantile": q}))
            return repairs[key]

        gates = {}

        def smoothed(key, layer):
            base = repair(key)
            # the gate reads the layer's input: the same for every tau and alpha where it is the
            # set's first layer, else it depends on the repairs before it
            gate_key = layer if layer == key[0][0] else (key, layer)
            if gate_key not in gates:
                gates[gate_key] = calibrate_smoothing(model, base, layer, clean, config.smoothing_quantile,
                                                      config.batch)
            return Profile(layers=base.layers, fingerprint=base.fingerprint, info=dict(base.info),
                           smoothing=gates[gate_key])

        def candidate(key, layer):
            e = {"layers": list(key[0]), "tau_quantile": key[1], "alpha": key[2], "smoothing_layer": layer,
                 "clean_change": None, "expected_drop": None}
            try:
                e.update(_evidence(model, smoothed(key, layer), *args, with_costs=False))
            except ValueError as err:  # this layer cannot flag pixels (no 2-D positions); never chosen
                e["error"] = str(err)
            return e

        evidence = [chosen] + [candidate(key, layer) for key in list(repairs) for layer in key[0]]
        if all("error" in e for e in evidence[1:]):
            profile.info["smoothing"] = {"offered": False, "why": evidence[1]["error"]}
            return

        def key_of(e):
            return tuple(e["layers"]), e["tau_quantile"], e["alpha"]

        def measure(e):
            with attached(model, smoothed(key_of(e), e["smoothing_layer"])):
                e.update(_clean_costs(model, clean, ref, config))

        n = len(pairs[0]) if pairs is not None else len(flagged)
        if pairs is not None:
            won = choose(evidence, config.max_clean_change, measure, n, "twin_kl", config.clean_cost,
                         config.agreement_slack, config.max_class_cost)
        else:
            won = chosen
            for e in evidence[1:]:
                if "error" in e:
                    continue
                measure(e)
                fits = e[config.clean_cost] <= config.max_clean_change and \
                    e["worst_class_cost"] <= config.max_class_cost
                if fits and (round(e["agreement"] * n), -e["target_probability"]) > \
                        (round(won["agreement"] * n), -won["target_probability"]):
                    won = e
    info = {"offered": True, "chosen": won is not chosen, "quantile": config.smoothing_quantile,
            "gates": [{"layer": g.layer, "gate": g.gate} for g in gates.values()],
            "rule": "paired: choose (agreement within the slack, then twin_kl), in sample" if pairs is not None else
            "unpaired: flagged moved off the target, then the target's probability", "candidates": evidence}
    if won is chosen:
        profile.info["smoothing"] = info
        return
    # the winner's own estimate (its layers' info) with the selection's record, which says that
    # the smoothing stage replaced the out-of-fold choice
    sel.profile = smoothed(key_of(won), won["smoothing_layer"])
    sel.profile.info = {**sel.profile.info, "smoothing": info,
                        "selection": {**profile.info.get("selection", {}), "replaced_by_smoothing": won}}
    sel.layers, sel.tau_quantile, sel.alpha = list(won["layers"]), won["tau_quantile"], won["alpha"]
