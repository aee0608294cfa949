"""One evaluation run: train (or load) a backdoored model, estimate FIRE on the defender's
held-out half of the test set, and score every defence on the other half with the same metrics.

The defender holds: clean held-out images, and (paired setting) their triggered twins or
(unpaired setting) `n_poison_seen` triggered images with no twins. Evaluation images are never
used for estimation, calibration or selection.
"""
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import fire_repair as fr
from fire_repair.augment import Photometric, RandomShift

from . import attacks as attacks_mod
from . import data as data_mod
from . import models as models_mod
from .baselines import BASELINES
from .metrics import auroc, predict, rates
from .train import load_or_train

FIRE_DEFENSES = ["fire-clamp", "fire-project", "fire-shift", "fire-shift-gated", "fire-clamp-unpaired"]
DEFAULT_DEFENSES = ["none", *FIRE_DEFENSES, "shrinkpad", "jpeg", "blur", "strip"]


@dataclass
class RunConfig:
    attack: str = "badnets"
    model: str = "cnn"
    data: str = "digits"
    data_path: Optional[str] = None
    rate: float = 0.1
    target: int = 0
    seed: int = 0
    epochs: int = 8
    width: Optional[int] = None
    defenses: list = field(default_factory=lambda: list(DEFAULT_DEFENSES))
    layers: Optional[list] = None  # candidate layers (default: the model's REPAIRABLE list)
    alphas: list = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    k: int = 1
    tau_quantile: float = 0.99
    n_poison_seen: int = 64
    match_clean: bool = True  # unpaired: leave the inferred target class out of the clean reference
    max_clean_change: float = 0.01
    online: bool = True
    ablations: bool = True
    cache_dir: Optional[str] = ".fire-cache"


class _GatedFire:
    """The paper's shift applied only to the samples the projection-score detector flags
    (score above `threshold` clean standard deviations); the rest pass unrepaired."""

    def __init__(self, model, profile, threshold: float = 3.0):
        self.model, self.profile, self.threshold = model, profile, threshold

    def predict(self, x):
        pred = torch.empty(len(x), dtype=torch.int64)
        fr.attach(self.model, self.profile)
        try:
            flags = fr.scores(self.model, x)[self.profile.layer_names[0]] > self.threshold
            pred[flags] = predict(self.model, x[flags])
        finally:
            fr.detach(self.model)
        pred[~flags] = predict(self.model, x[~flags])
        return pred


class _Fire:
    """A FIRE profile as a defence of the harness."""

    def __init__(self, model, profile):
        self.model, self.profile = model, profile

    def predict(self, x):
        fr.attach(self.model, self.profile)
        try:
            return predict(self.model, x)
        finally:
            fr.detach(self.model)


def run(cfg: RunConfig, dataset: Optional[data_mod.Dataset] = None, progress: bool = True, log=print) -> dict:
    t0 = time.perf_counter()
    ds = dataset or data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
    attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed)
    unknown = [d for d in cfg.defenses if d not in BASELINES and d not in FIRE_DEFENSES]
    if unknown:
        raise ValueError(f"unknown defence(s) {unknown}; choose from {DEFAULT_DEFENSES}")

    # -- the backdoored model
    x_train, y_train, poisoned_idx = attacks_mod.poison_training_set(ds.x_train, ds.y_train, attack, cfg.rate,
                                                                     cfg.seed)
    torch.manual_seed(cfg.seed)
    model = models_mod.build(cfg.model, ds.num_classes, cfg.width)
    spec = {"attack": cfg.attack, "params": attack.params(), "model": cfg.model, "width": cfg.width,
            "data": ds.name, "n_train": len(y_train), "rate": cfg.rate, "seed": cfg.seed, "epochs": cfg.epochs}
    model, cached = load_or_train(model, x_train, y_train, cfg.cache_dir, spec, epochs=cfg.epochs, seed=cfg.seed,
                                  progress=progress, desc=f"training {cfg.model} / {cfg.attack}")
    for p in model.parameters():
        p.requires_grad_(False)

    # -- splits: defender's held-out half and the evaluation half
    px, cx, ty = attacks_mod.poisoned_test_set(ds.x_test, ds.y_test, attack)
    h, ph = len(ds.y_test) // 2, len(ty) // 2
    hold_clean, eval_clean, eval_y = ds.x_test[:h], ds.x_test[h:], ds.y_test[h:]
    hold_pairs = (cx[:ph], px[:ph])
    eval_poison, eval_poison_y = px[ph:], ty[ph:]
    n_seen = min(cfg.n_poison_seen, ph)
    score = lambda pc, pp: rates(pc, eval_y, pp, eval_poison_y, attack.target)  # noqa: E731

    layers = cfg.layers or models_mod.MODELS[cfg.model].REPAIRABLE
    est = fr.Estimator(model, layers, k=cfg.k, seed=cfg.seed)
    est.observe(hold_clean, poisoned=False)
    est.observe_pairs(*hold_pairs)

    result = {"config": asdict(cfg), "model_cached": cached, "poisoned_train": len(poisoned_idx),
              "n_eval_clean": len(eval_y), "n_eval_poison": len(eval_poison_y), "rows": [], "fire": {}}
    selections = {}
    for name in cfg.defenses:
        t = time.perf_counter()
        extra = {}
        if name == "fire-shift-gated":
            sel = selections.get("shift") or fr.select(model, est, *hold_pairs, modes=["shift"], alphas=cfg.alphas,
                                                       max_clean_change=cfg.max_clean_change)
            # gating protects clean inputs, so alpha = 1: the paper's full shift by beta
            profile = est.profile(mode="shift", alpha=1.0, layers=sel.layers)
            defence = _GatedFire(model, profile)
            extra = {"layers": sel.layers, "alpha": 1.0}
        elif name.startswith("fire-") and not name.endswith("unpaired"):
            mode = name.split("-")[1]
            sel = fr.select(model, est, *hold_pairs, modes=[mode], alphas=cfg.alphas,
                            max_clean_change=cfg.max_clean_change, tau_quantile=cfg.tau_quantile)
            selections[mode] = sel
            defence = _Fire(model, sel.profile)
            extra = {"layers": sel.layers, "alpha": sel.alpha}
            result["fire"][mode] = {"layers": sel.layers, "alpha": sel.alpha, "evidence": sel.evidence}
        elif name == "fire-clamp-unpaired":
            profile, extra = _unpaired_profile(model, layers, cfg, hold_clean, hold_pairs[1][:n_seen])
            defence = _Fire(model, profile)
            result["fire"]["clamp-unpaired"] = extra
        else:
            defence = BASELINES[name]().fit(model, hold_clean)
        row = {"defense": name, **score(defence.predict(eval_clean), defence.predict(eval_poison)),
               "seconds": time.perf_counter() - t, **extra}
        result["rows"].append(row)
        log(f"  {cfg.attack:>9} {name:<20} CA {100 * row['CA']:5.1f}  ASR {100 * row['ASR']:5.1f}  "
            f"PA {100 * row['PA']:5.1f}")

    chosen = selections.get("clamp") or next(iter(selections.values()), None)
    if chosen is not None:
        fr.attach(model, chosen.profile)
        try:
            pos = fr.scores(model, eval_poison)[chosen.layers[0]]
            neg = fr.scores(model, eval_clean)[chosen.layers[0]]
        finally:
            fr.detach(model)
        result["auroc"] = auroc(pos, neg)
        if cfg.online:
            result["online"] = _online_curve(model, chosen, cfg, hold_clean, hold_pairs[1], eval_poison, eval_poison_y)
        if cfg.ablations:
            result["ablations"] = _ablations(model, est, chosen, cfg, hold_clean, hold_pairs[1][:n_seen], score,
                                             eval_clean, eval_poison)
    result["seconds"] = time.perf_counter() - t0
    return result


def clean_reference(model, hold_clean, poisoned_seen, match: bool = True):
    """The clean set an unpaired estimate is compared with. Poisoned inputs never come from the
    target class, so a clean set that includes it adds a content difference (that class against
    the rest) to the trigger direction. Label-free matching: the target is the model's majority
    prediction on the poisoned samples seen, and clean samples the model assigns to it are left
    out. Returns (clean samples, inferred target or None)."""
    if not match or len(poisoned_seen) == 0:
        return hold_clean, None
    target = int(predict(model, poisoned_seen).mode().values)
    return hold_clean[predict(model, hold_clean) != target], target


def _unpaired_profile(model, layers, cfg, hold_clean, poisoned_seen, augment=None, match=None):
    """Unpaired FIRE: clean held-out vs `n_poison_seen` triggered images with no twins. No pairs,
    so the layer is chosen by the trigger's separation: the standardised gap of the poisoned
    projections above the clean ones (label-free and pair-free); alpha is 1."""
    match = cfg.match_clean if match is None else match
    clean, target = clean_reference(model, hold_clean, poisoned_seen, match)
    est = fr.Estimator(model, layers, k=cfg.k, seed=cfg.seed, augment=augment, n_augment=4 if augment else 1)
    est.observe(clean, poisoned=False)
    est.observe(poisoned_seen, poisoned=True)
    gaps = {}
    for name in layers:
        layer = est.profile(mode="project", layers=[name]).layer(name)
        gaps[name] = float((layer.directions.flatten(1)[0] @ layer.beta.flatten()) / layer.score_scale[0])
    best = max(gaps, key=gaps.get)
    profile = est.profile(mode="clamp", alpha=1.0, tau_quantile=cfg.tau_quantile, layers=[best], source="unpaired")
    return profile, {"layers": [best], "alpha": 1.0, "separation": gaps, "n_poison_seen": len(poisoned_seen),
                     "inferred_target": target, "n_clean_reference": len(clean)}


def _online_curve(model, sel, cfg, hold_clean, stream, eval_poison, eval_poison_y, batch: int = 8):
    """PA on the evaluation set as the online loop sees more poisoned samples (caller flags).
    The clean reference is matched (see clean_reference) on the first poisoned batch only."""
    clean, _ = clean_reference(model, hold_clean, stream[:batch], cfg.match_clean)
    est = fr.Estimator(model, sel.layers, k=cfg.k, seed=cfg.seed)
    est.observe(clean, poisoned=False)
    online = fr.Online(model, est, mode="clamp", alpha=sel.alpha, tau_quantile=cfg.tau_quantile, threshold=None)
    curve = [[0, (predict(model, eval_poison) == eval_poison_y).float().mean().item()]]
    step_seconds = []
    try:
        for i in range(0, min(len(stream), 128), batch):
            xb = stream[i:i + batch]
            t = time.perf_counter()
            online.step(xb, poisoned=torch.ones(len(xb), dtype=torch.bool))
            step_seconds.append((time.perf_counter() - t) / len(xb))
            curve.append([online.seen_poisoned, (predict(model, eval_poison) == eval_poison_y).float().mean().item()])
    finally:
        online.close()
    return {"curve": curve, "ms_per_sample": 1e3 * sum(step_seconds) / max(len(step_seconds), 1)}


def _ablations(model, est, sel, cfg, hold_clean, poisoned_seen, score, eval_clean, eval_poison):
    """FIRE's choices one at a time around the selected clamp repair, scored on the evaluation set.
    `est` is the run's paired estimator (its statistics do not depend on k or tau)."""
    rows = []

    def add(what, profile):
        d = _Fire(model, profile)
        rows.append({"ablation": what, **score(d.predict(eval_clean), d.predict(eval_poison))})

    layer = sel.layers
    for k in (1, 2, 4):
        try:
            add(f"k={k}", est.profile(mode="clamp", alpha=sel.alpha, tau_quantile=cfg.tau_quantile, k=k, layers=layer))
        except ValueError as e:  # fewer supported directions than asked
            rows.append({"ablation": f"k={k}", "error": str(e)})
    variants = (("unpaired", None, cfg.match_clean), ("unpaired, clean set not matched", None, False),
                ("unpaired+photometric", Photometric(seed=cfg.seed), cfg.match_clean),
                ("unpaired+shift", RandomShift(seed=cfg.seed), cfg.match_clean))
    for source, augment, match in variants:
        profile, _ = _unpaired_profile(model, layer, cfg, hold_clean, poisoned_seen, augment, match)
        add(source, profile)
    for q in (0.9, 0.999):
        add(f"tau_quantile={q}", est.profile(mode="clamp", alpha=sel.alpha, tau_quantile=q, k=cfg.k, layers=layer))
    return rows
