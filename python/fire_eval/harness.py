"""One evaluation run: train (or load) a backdoored model, give the defender a held-out part of
the test set, fit every defense on it, and score them all on the rest with the same metrics.

The defender holds (`Held`): clean held-out images, `n_pairs` triggered images with their clean
twins (paired FIRE) and `n_poison_seen` other triggered images with no twins (unpaired FIRE).
Evaluation images are never used for estimation, calibration or selection.

Steps of `run`: `backdoored_model` -> `split` -> each defense's `fit` / `predict` ->
`detection_auroc`, `online_curve`, `ablations`.
"""
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

import fire_repair as fr
from fire_repair.augment import Photometric, RandomShift

from . import attacks as attacks_mod
from . import data as data_mod
from . import models as models_mod
from .baselines import BASELINES, Defense
from .metrics import auroc, predict, rates
from .report import headline_name
from .train import load_or_train

# the recipe's defaults are the harness's: one definition, fr.FitConfig's
RECIPE = fr.FitConfig()


@dataclass
class RunConfig:
    attack: str = "badnets"
    model: str = "cnn"
    data: str = "digits"
    data_path: Optional[str] = None
    rate: float = 0.1
    attack_params: dict = field(default_factory=dict)  # overrides of the attack's parameters (attacks.build)
    target: int = 0
    seed: int = 0
    epochs: Optional[int] = None  # None: the model's default (models.EPOCHS)
    width: Optional[int] = None
    defenses: list = field(default_factory=lambda: list(DEFAULT_DEFENSES))
    layers: Optional[list] = None  # candidate layers (default: the model's REPAIRABLE list)
    layer_pairs: bool = RECIPE.layer_pairs  # also try each two consecutive candidate layers together
    # the repair forms selection chooses between; per position only at layers with positions
    # (evidence: docs/method.md#forms)
    forms: list = field(default_factory=lambda: list(RECIPE.forms))
    # paired selection's alphas (evidence: docs/method.md#alphas)
    alphas: list = field(default_factory=lambda: list(RECIPE.alphas))
    # unpaired selection's alphas, the coarser grid (evidence: docs/method.md#unpaired-alphas)
    unpaired_alphas: list = field(default_factory=lambda: list(RECIPE.unpaired_alphas))
    k: int = RECIPE.k  # directions per layer (evidence: docs/method.md#k)
    # clamp's tau: candidate clean quantiles, chosen per layer set like alpha (evidence: docs/method.md#tau-quantiles)
    tau_quantile: list = field(default_factory=lambda: list(RECIPE.tau_quantile))
    # gated's tau, one clean quantile (evidence: docs/method.md#gate-quantile)
    gate_quantile: float = RECIPE.gate_quantile[0]
    # invert's gate: candidate clean quantiles, chosen per layer set (evidence: docs/method.md#invert-quantiles)
    invert_quantile: list = field(default_factory=lambda: list(RECIPE.invert_quantile))
    # paired FIRE estimates and selects from this many triggered images and twins (evidence: docs/method.md#n-pairs)
    n_pairs: int = 16
    n_poison_seen: int = 64  # unpaired FIRE: flagged triggered images, no twins (docs/method.md#n-pairs)
    n_clean_holdout: Optional[int] = None  # clean held-out images for estimation (None: half the test set)
    n_eval: Optional[int] = None  # evaluation images per split (None: the other half)
    folds: int = RECIPE.folds  # selection's out-of-fold split (evidence: docs/method.md#folds)
    # unpaired: leave the inferred target class out of the clean reference (evidence: docs/method.md#match-clean)
    match_clean: bool = RECIPE.match_clean
    # the clean cost a chosen repair may have, measured as clean_cost: "expected_drop" (each flipped
    # prediction weighed by the unrepaired model's probabilities) or "clean_change" (the share of
    # predictions flipped) (evidence: docs/method.md#max-clean-change)
    max_clean_change: float = RECIPE.max_clean_change
    max_class_cost: float = RECIPE.max_class_cost  # the same within any one predicted class (a guard)
    clean_cost: str = RECIPE.clean_cost
    tie_break: str = RECIPE.tie_break  # paired selection's: "twin_kl" or "margin" (evidence: docs/method.md#tie-break)
    # paired selection: agreements this many twins apart are ties (evidence: docs/method.md#agreement-slack)
    agreement_slack: int = RECIPE.agreement_slack
    # paired estimation: "mean" or "control_variate" (fr.Estimator) (evidence: docs/method.md#paired-beta)
    paired_beta: str = RECIPE.paired_beta
    # paired FIRE's headline fitted again on this many draws of the defender's pairs (draw 0: the
    # rows' own pairs) (evidence: docs/method.md#one-draw-of-the-pairs-is-one-sample)
    pair_draws: int = 1
    online: bool = True
    ablations: bool = True
    cache_dir: Optional[str] = ".fire-cache"


@dataclass
class Held:
    """What the defender holds."""
    clean: torch.Tensor
    pairs: tuple  # (clean twins, triggered)
    flagged: torch.Tensor  # triggered, no twins
    # every (clean twin, triggered) pair the defender's half can make; `pairs` is its first n_pairs
    pool: Optional[tuple] = None

    def drawn(self, draw: int, n: int) -> "Held":
        """The same clean and flagged images with n other pairs from the pool (draw 0: these)."""
        if draw == 0:
            return self
        if self.pool is None:
            raise ValueError("this Held has no pool of pairs to draw from")
        idx = torch.randperm(len(self.pool[0]), generator=torch.Generator().manual_seed(draw))[:n]
        return Held(clean=self.clean, pairs=(self.pool[0][idx], self.pool[1][idx]), flagged=self.flagged,
                    pool=self.pool)


@dataclass
class Run:
    """What one harness run holds, from which every row is fitted (`Defense.fit_run`)."""
    cfg: RunConfig
    ds: object
    model: torch.nn.Module
    held: Held
    layers: list
    progress: bool


class CleanModel(Defense):
    """The reference row `clean-model`, not a defense: the undefended predictions of the model
    of the run's recipe trained without poison (`clean_model`). Its ASR is the floor a repair
    can be held to, its PA the ceiling."""
    name = "clean-model"
    reference = True

    def fit_run(self, run):
        return self.fit(clean_model(run.cfg, run.ds, run.progress), run.held.clean)


# ----------------------------------------------------------------------------- FIRE as defenses

class ProfileDefense(Defense):
    """A fixed FIRE profile (ablations)."""

    def __init__(self, model, profile):
        self.model, self.profile = model, profile

    def predict(self, x):
        fr.attach(self.model, self.profile)
        try:
            return predict(self.model, x)
        finally:
            fr.detach(self.model)


class FireDefense(ProfileDefense):
    """A FIRE variant with the baselines' fit/predict: `fit` estimates and selects (label-free,
    out of fold) on what the defender holds, the mode among `modes` included, and so chooses the
    profile that `predict` attaches."""

    def __init__(self, modes=("clamp",), paired: bool = True, name: Optional[str] = None):
        self.modes, self.paired = tuple(modes), paired
        self.name = name or f"fire-{'+'.join(self.modes)}{'' if paired else '-unpaired'}"

    def fit_run(self, run):
        return self.fit(run.model, run.held.clean, run.held, run.cfg, run.layers)

    def fit(self, model, x_clean, held: Held = None, cfg: RunConfig = None, layers=None, layer_sets=None):
        """`layer_sets` (default: each of `layers`, and neighbouring pairs where cfg.layer_pairs)
        are the candidates selection chooses among."""
        if held is None or cfg is None:
            raise ValueError(f"{self.name} needs the defender's held-out data and the run's config")
        self.model = model
        data = {"pairs": held.pairs} if self.paired else {"flagged": held.flagged}
        self.fitted = fr.fit(model, held.clean, config=fit_config(cfg, model, layers, self.modes),
                             sets=layer_sets, **data)
        self.selection, self.profile = self.fitted.selection, self.fitted.profile
        return self

    def report_choice(self) -> dict:
        sel = self.selection
        return {"layers": sel.layers, "form": sel.form, "mode": sel.mode, "tau_quantile": sel.tau_quantile,
                "alpha": sel.alpha, "smoothing": self.fitted.choice["smoothing"]}

    def report(self) -> dict:
        return {**self.report_choice(), "evidence": self.selection.evidence}


# `fire` and `fire-unpaired` choose the mode too (label-free, with the layer and alpha): clamp
# moves what lies beyond the clean range, gated shifts by beta what the clean quantile flags,
# invert also undoes the scaling a blend applies (its slope from the pairs, or unpaired from the
# flagged rows' spread, flattened only).
# The one-mode rows are FIRE's ablations of that choice (evidence: docs/method.md#modes).
SELECTED_MODES = ("clamp", "gated", "invert")
UNPAIRED_MODES = SELECTED_MODES
FIRE_DEFENSES = {
    "fire": lambda: FireDefense(SELECTED_MODES, name="fire"),
    "fire-unpaired": lambda: FireDefense(UNPAIRED_MODES, paired=False, name="fire-unpaired"),
    "fire-clamp": lambda: FireDefense(("clamp",)),
    "fire-gated": lambda: FireDefense(("gated",)),
    "fire-invert": lambda: FireDefense(("invert",)),
    "fire-project": lambda: FireDefense(("project",)),
    "fire-shift": lambda: FireDefense(("shift",)),
    "fire-clamp-unpaired": lambda: FireDefense(("clamp",), paired=False),
}
CLEAN_MODEL = CleanModel.name
DEFENSES = {**{name: cls for name, cls in BASELINES.items()}, CLEAN_MODEL: CleanModel, **FIRE_DEFENSES}
# Left out by default (each FIRE row costs a fit; run them by name): project and shift, which move
# clean inputs too (selection keeps their alpha low; on CIFAR-10 they trail clamp on 5 of 6
# attacks, Trojan: project 77.2 % PA, clamp 76.9 %), and
# `fire-unpaired` too: unpaired, choosing the mode helps on three CIFAR-10 attacks and hurts on one
# (BadNets 77.2 % PA against clamp's 76.0 but 0.7 point of CA, Blended 76.1 against 73.4, SIG 77.9
# against 76.9; adaptive 71.3 against 74.9), and clamp alone is within 3 points of paired on 5 of 6
DEFAULT_DEFENSES = ["none", CLEAN_MODEL,
                    *(d for d in FIRE_DEFENSES if d not in ("fire-project", "fire-shift", "fire-unpaired")),
                    "shrinkpad", "jpeg", "blur", "strip"]


# ----------------------------------------------------------------------------- the run's steps

def fit_config(cfg: RunConfig, model, layers, modes) -> "fr.FitConfig":
    """The run's recipe as fr.fit reads it (the harness's candidate layers: the model's REPAIRABLE list)."""
    return fr.FitConfig(layers=layers, layer_pairs=cfg.layer_pairs, forms=tuple(cfg.forms),
                        channel_dim=None if model is None else models_mod.channel_dim(model), modes=tuple(modes),
                        alphas=tuple(cfg.alphas),
                        unpaired_alphas=tuple(cfg.unpaired_alphas), tau_quantile=tuple(cfg.tau_quantile),
                        gate_quantile=(cfg.gate_quantile,), invert_quantile=tuple(cfg.invert_quantile), k=cfg.k,
                        folds=cfg.folds, seed=cfg.seed, paired_beta=cfg.paired_beta,
                        max_clean_change=cfg.max_clean_change, clean_cost=cfg.clean_cost,
                        max_class_cost=cfg.max_class_cost, tie_break=cfg.tie_break,
                        agreement_slack=cfg.agreement_slack, match_clean=cfg.match_clean)


def estimator(model, layers, cfg: RunConfig, form: str, **kwargs) -> "fr.Estimator":
    """One estimator of the run's settings in `form` ("flattened" or "per_position")."""
    if form not in fr.FORMS:
        raise ValueError(f"form must be 'flattened' or 'per_position', got {form!r}")
    return fr.Estimator(model, layers, k=cfg.k, seed=cfg.seed, per_position=form == "per_position",
                        channel_dim=models_mod.channel_dim(model), paired_beta=cfg.paired_beta, **kwargs)


def positional_layers(model, layers, x) -> list:
    """The layers among `layers` with positions, as the model's channel_dim lays them out."""
    return fr.positional_layers(model, layers, x, models_mod.channel_dim(model))


def trained_model(cfg: RunConfig, ds, x, y, spec: dict, progress: bool, regularizer=None):
    """(model, cached): the run's architecture trained on (x, y) with the run's recipe, or loaded
    from the cache under `spec` (what it was trained on) and the recipe; frozen. `regularizer`:
    train.train's (an attack's training loss; `spec` must name what sets it)."""
    torch.manual_seed(cfg.seed)
    model = models_mod.build(cfg.model, ds.num_classes, cfg.width)
    epochs = cfg.epochs or models_mod.EPOCHS.get(cfg.model, 8)
    spec = {**spec, "model": cfg.model, "width": cfg.width, "data": ds.name, "n_train": len(y), "seed": cfg.seed,
            "epochs": epochs}
    extra = {} if regularizer is None else {"regularizer": regularizer}
    model, cached = load_or_train(model, x, y, cfg.cache_dir, spec, epochs=epochs, seed=cfg.seed, progress=progress,
                                  desc=f"training {cfg.model} / {spec['attack']}", **extra)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cached


def clean_model(cfg: RunConfig, ds, progress: bool):
    """The never-poisoned model of the run's recipe (architecture, width, epochs, seed, data):
    the reference row `clean-model`. Its ASR is the floor a repair can be held to (a clean model
    calls some triggered images the target class too), its PA the ceiling."""
    return trained_model(cfg, ds, ds.x_train, ds.y_train, {"attack": "clean"}, progress)[0]


def backdoored_model(cfg: RunConfig, ds, attack, progress: bool):
    x_train, y_train, poisoned_idx = attacks_mod.poison_training_set(ds.x_train, ds.y_train, attack, cfg.rate,
                                                                     cfg.seed)
    spec = {"attack": cfg.attack, "params": attack.params(), "rate": cfg.rate}
    # an attack that shapes training (latent) adds its loss; its parameters are in the spec
    regularizer = attacks_mod.training_regularizer(attack, poisoned_idx, len(y_train))
    model, cached = trained_model(cfg, ds, x_train, y_train, spec, progress, regularizer)
    return model, cached, len(poisoned_idx)


def split(cfg: RunConfig, ds, attack):
    """(Held, (eval_clean, eval_y), (eval_poison, eval_poison_y), stream): the defender's half and
    the evaluation half of the test set, disjoint (triggered images are made from each half's own
    non-target images). The halves come from a seeded permutation: image folders list the test
    set class by class, and halves of a class-ordered set would give the defender some classes
    and the evaluation the others."""
    perm = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(cfg.seed))
    h = len(perm) // 2
    mine, theirs = perm[:h], perm[h:]
    px, cx, _ = attacks_mod.poisoned_test_set(ds.x_test[mine], ds.y_test[mine], attack)
    eval_px, _, eval_ty = attacks_mod.poisoned_test_set(ds.x_test[theirs], ds.y_test[theirs], attack)
    n_hold = h if cfg.n_clean_holdout is None else min(h, cfg.n_clean_holdout)
    n_eval, n_pairs = cfg.n_eval, min(cfg.n_pairs, len(px) // 2)
    held = Held(clean=ds.x_test[mine[:n_hold]], pairs=(cx[:n_pairs], px[:n_pairs]),
                flagged=px[n_pairs:n_pairs + min(cfg.n_poison_seen, len(px) - n_pairs)], pool=(cx, px))
    return (held, (ds.x_test[theirs[:n_eval]], ds.y_test[theirs[:n_eval]]), (eval_px[:n_eval], eval_ty[:n_eval]),
            px[n_pairs:])


def run(cfg: RunConfig, dataset: Optional[data_mod.Dataset] = None, progress: bool = True, log=print) -> dict:
    t0 = time.perf_counter()
    unknown = [d for d in cfg.defenses if d not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense(s) {unknown}; choose from {sorted(DEFENSES)}")
    if cfg.pair_draws < 1:
        raise ValueError(f"pair_draws must be at least 1 (the harness's own pairs), got {cfg.pair_draws}")
    ds = dataset or data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
    attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
    model, cached, n_poisoned = backdoored_model(cfg, ds, attack, progress)
    held, (eval_clean, eval_y), (eval_poison, eval_poison_y), stream = split(cfg, ds, attack)
    layers = cfg.layers or model.REPAIRABLE

    def score(defense):
        return rates(defense.predict(eval_clean), eval_y, defense.predict(eval_poison), eval_poison_y, attack.target)

    result = {"config": asdict(cfg), "attack_params": attack.params(), "model_cached": cached,
              "poisoned_train": n_poisoned, "n_eval_clean": len(eval_y), "n_eval_poison": len(eval_poison_y),
              "n_pairs": len(held.pairs[0]), "n_flagged": len(held.flagged), "n_clean_holdout": len(held.clean),
              "rows": [], "fire": {}}
    fitted, here = {}, Run(cfg=cfg, ds=ds, model=model, held=held, layers=layers, progress=progress)
    for name in cfg.defenses:
        t = time.perf_counter()
        defense = DEFENSES[name]()
        with warnings.catch_warnings(record=True) as caught:  # into run.log, beside the row they concern
            warnings.simplefilter("default")
            defense.fit_run(here)
        for w in caught:
            log(f"  {cfg.attack:>9} {name}: {w.category.__name__}: {w.message}")
        fitted[name] = defense
        row = {"defense": name, **score(defense), "seconds": time.perf_counter() - t}
        if defense.reference:
            row["reference"] = True
        if isinstance(defense, FireDefense):
            row.update(defense.report_choice())
            result["fire"][name] = defense.report()
        result["rows"].append(row)
        log(f"  {cfg.attack:>9} {name:<20} CA {100 * row['CA']:5.1f}  ASR {100 * row['ASR']:5.1f}  "
            f"PA {100 * row['PA']:5.1f}  ({row['seconds']:.0f} s)")

    fire = {n: d for n, d in fitted.items() if isinstance(d, FireDefense)}
    chosen = fire.get(headline_name(fire))
    if chosen is not None:
        result["auroc"] = detection_auroc(model, chosen.profile, eval_clean, eval_poison)
        if cfg.online:
            # online updates are unpaired evidence: follow the unpaired selection where one was
            # fitted (the ViT's trigger token: its paired headline at `tokens+block1` fell to 28 %
            # online, unpaired per position at `tokens` 38.5 %), else the headline's choice
            name = next((n for n, d in fire.items() if not d.paired), headline_name(fire))
            result["online"] = {"follows": name, **fire[name].report_choice(),
                                **online_curve(model, fire[name].selection, cfg, held.clean, stream, eval_poison,
                                               eval_poison_y)}
        if cfg.ablations:
            result["ablations"] = ablations(model, chosen, cfg, held, layers, score)
            log(f"  {cfg.attack:>9} ablations: " + ", ".join(
                f"{r['ablation']} PA {100 * r['PA']:.1f}" for r in result["ablations"] if "PA" in r))
        if cfg.pair_draws > 1 and chosen.paired:
            name = headline_name(fire)
            first = next(r for r in result["rows"] if r["defense"] == name)
            result["pair_draws"] = pair_draws(here, name, first, score, log)
    result["seconds"] = time.perf_counter() - t0
    return result


def pair_draws(run: Run, name: str, first: dict, score, log=print) -> dict:
    """The paired FIRE defense `name` fitted again on `run.cfg.pair_draws - 1` other draws of the
    defender's pairs (estimator and fold seed changed with the draw, the evaluation half the
    same); `first` is its row on the harness's own pairs (draw 0). Every draw's choice, PA, CA
    and ASR."""
    cfg, n = run.cfg, len(run.held.pairs[0])
    kept = ("CA", "ASR", "PA", "layers", "form", "mode", "tau_quantile", "alpha")
    draws = [{"draw": 0, **{k: first[k] for k in kept}}]
    for d in range(1, cfg.pair_draws):
        t = time.perf_counter()
        cfg_d = replace(cfg, seed=cfg.seed + d)  # the estimators' and the folds' seed only
        defense = DEFENSES[name]()
        defense.fit(run.model, run.held.clean, run.held.drawn(d, n), cfg_d, run.layers)
        row = {**score(defense), **defense.report()}
        draws.append({"draw": d, **{k: row[k] for k in kept}})
        log(f"  {cfg.attack:>9} {name} pair draw {d}/{cfg.pair_draws - 1}: PA {100 * draws[-1]['PA']:.1f}  "
            f"({time.perf_counter() - t:.0f} s)")
    return {"defense": name, "n_pairs": n, "draws": draws}


def unpaired_mode(mode: str, form: str) -> str:
    """The mode an unpaired estimate (the unpaired ablations) runs for a chosen `mode`: invert
    per position needs the pairs' slope, so there its unpaired counterpart is gated (invert
    without it); flattened, unpaired invert takes its slope from the flagged rows' spread."""
    return "gated" if mode == "invert" and form == "per_position" else mode


def tau_quantiles(cfg: RunConfig, modes) -> dict:
    """The candidate clean quantiles of tau per mode of `modes` (None for the modes without tau),
    as fr.select reads them."""
    return fit_config(cfg, None, None, modes).tau_candidates(modes)


def detection_auroc(model, profile, eval_clean, eval_poison) -> float:
    """AUROC of the projection score at the profile's first layer (triggered vs clean)."""
    fr.attach(model, profile)
    try:
        layer = profile.layer_names[0]
        return auroc(fr.backdoor_scores(model, eval_poison)[layer], fr.backdoor_scores(model, eval_clean)[layer])
    finally:
        fr.detach(model)


def clean_reference(model, hold_clean, poisoned_seen, match: bool = True):
    """The clean set an unpaired estimate is compared with (fr.matched_clean where `match`):
    (clean samples, inferred target or None)."""
    if not match or len(poisoned_seen) == 0:
        return hold_clean, None
    return fr.matched_clean(model, hold_clean, poisoned_seen)


def online_curve(model, sel, cfg, hold_clean, stream, eval_poison, eval_poison_y, batch: int = 8):
    """PA on the evaluation set as the online loop sees more poisoned samples (caller flags).
    The clean reference is matched (see clean_reference) on the first poisoned batch only."""
    clean, _ = clean_reference(model, hold_clean, stream[:batch], cfg.match_clean)
    est = estimator(model, sel.layers, cfg, sel.form)
    est.observe(clean, poisoned=False)
    mode = "gated" if sel.mode == "invert" else sel.mode  # Online refuses invert (no slope online)
    online = fr.Online(est, mode=mode, alpha=sel.alpha, threshold=None,
                       **({} if sel.tau_quantile is None else {"tau_quantile": sel.tau_quantile}))
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
    return {"mode": mode, "curve": curve, "ms_per_sample": 1e3 * sum(step_seconds) / max(len(step_seconds), 1)}


def ablations(model, chosen: FireDefense, cfg, held: Held, layers, score) -> list:
    """FIRE's choices one at a time around the selected repair, scored on the evaluation
    set: every single layer (the best layer in hindsight against the chosen one, in the chosen
    form), the other form at the chosen layers, k, the unpaired variants and tau. The other form
    gets its own mode, tau and alpha, chosen as the headline chose its own (same modes, same
    pairs or flagged set): the chosen form's would be no fair test of it."""
    sel, rows = chosen.selection, []
    positional = positional_layers(model, layers, held.clean[:2])
    watch = positional if sel.form == "per_position" else list(layers)
    est = estimator(model, watch, cfg, sel.form)
    est.observe(held.clean, poisoned=False)
    est.observe_pairs(*held.pairs)

    def add(what, make_profile):
        try:
            profile = make_profile()
        except ValueError as e:  # not estimable from these samples (e.g. fewer supported directions than k)
            rows.append({"ablation": what, "error": str(e)})
            return
        rows.append({"ablation": what, **score(ProfileDefense(model, profile))})

    mode, alpha = sel.mode, sel.alpha
    q = 0.99 if sel.tau_quantile is None else sel.tau_quantile  # project/shift: read by no kernel
    for name in watch:
        add(f"layer={name}", lambda name=name: est.profile(mode=mode, alpha=alpha, tau_quantile=q,
                                                           layers=[name]))
    other = "flattened" if sel.form == "per_position" else "per_position"
    if other == "flattened" or set(sel.layers) <= set(positional):
        what = f"form={other} (selected layers, its own mode, tau and alpha)"
        try:  # as `add`, with the other form's own choice recorded beside its scores
            fit = FireDefense(chosen.modes, chosen.paired).fit(model, held.clean, held, replace(cfg, forms=[other]),
                                                               layer_sets=[sel.layers])
        except ValueError as e:
            rows.append({"ablation": what, "error": str(e)})
        else:
            own = fit.report_choice()
            rows.append({"ablation": what, **score(fit), **{k: own[k] for k in ("mode", "tau_quantile", "alpha")}})
    for other_mode in SELECTED_MODES:  # at the other mode's most conservative candidate quantile
        if other_mode != mode:
            add(f"mode={other_mode} (selected layers)",
                lambda m=other_mode: est.profile(mode=m, alpha=alpha, tau_quantile=max(tau_quantiles(cfg, [m])[m]),
                                                 layers=sel.layers))
    for k in (1, 2, 4):
        add(f"k={k}", lambda k=k: est.profile(mode=mode, alpha=alpha, tau_quantile=q, k=k,
                                              layers=sel.layers))
    variants = (("unpaired", None, cfg.match_clean), ("unpaired, clean set not matched", None, False),
                ("unpaired+photometric", Photometric(seed=cfg.seed), cfg.match_clean),
                ("unpaired+shift", RandomShift(seed=cfg.seed), cfg.match_clean))
    umode = unpaired_mode(mode, sel.form)
    for what, augment, match in variants:
        clean, _ = clean_reference(model, held.clean, held.flagged, match)
        u = estimator(model, sel.layers, cfg, sel.form, augment=augment, n_augment=4 if augment else 1)
        u.observe(clean, poisoned=False)
        u.observe(held.flagged, poisoned=True)
        add(f"{what} (selected layers{', gated' if umode != mode else ''})",
            lambda u=u: u.profile(mode=umode, alpha=alpha, tau_quantile=q))
    for other_q in (0.9, 0.99, 0.999):
        if mode in fr.TAU_MODES and other_q != q:
            add(f"tau_quantile={other_q}", lambda o=other_q: est.profile(mode=mode, alpha=alpha, tau_quantile=o,
                                                                      layers=sel.layers))
    return rows
