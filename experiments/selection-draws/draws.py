"""Paired selection rules over many draws of the defender's 16 pairs (not part of the library).

One harness row is one draw of 16 triggered images and twins; with 16 twins one twin is 6 % of
the agreement, so a rule judged on one draw is judged on noise. For each draw (draw 0: the
harness's own pairs and fold seed; draw d > 0: 16 other pairs of the defender's half, fold seed
d) this runs `fr.select` once on the finer alpha grid, then replays every rule below on that
draw's evidence (the default grid's candidates are a subset, scored identically) and measures
each chosen repair's PA and CA on the evaluation half. Clean costs are measured as selection
measures them (the repair from all 16 pairs, on the defender's clean images). Run from the
repository root:

    python experiments/selection-draws/draws.py MODEL ATTACK [DRAWS] [--rate R] [--params JSON]
        [--paired-beta control_variate]

MODEL is `cnn`, `vit` (the embedded digits, the demo's recipes) or `cifar` (CIFAR-10 cnn32, the
recipe of `../cifar10-jpeg-cnn32/`, images in /tmp/data). Writes MODEL-ATTACK.json beside this
file (MODEL-ATTACK-cv.json with the control-variate beta), or in `--out`. With `--candidates S`,
every candidate of the fine grid within S twins of the best agreement that keeps the clean limit
is scored too (its evidence, clean costs, PA and CA in the draw's "candidates"), so that other
tie-breaks can be replayed offline. `--pairs N` gives the defender N pairs instead of 16 (a
draw's first 16 are then the 16-pair run's draw; the JSON is MODEL-ATTACK[-cv]-Npairs.json).
`--resume` keeps the draws an earlier, interrupted run wrote (same settings) and runs the rest.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import fire_repair as fr
from fire_eval import attacks as attacks_mod
from fire_eval import data as data_mod
from fire_eval import harness
from fire_eval import models as models_mod
from fire_repair import selection as sel

torch.set_num_threads(1)
DEFAULT = [0.5, 1.0, 1.5, 2.0, 3.0]  # harness.RunConfig.alphas when this study ran (now FINE)
FINE = [0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
RULES = {f"{grid} grid, {tie}, slack {slack}": (alphas, tie, slack)
         for grid, alphas in (("default", DEFAULT), ("fine", FINE))
         for tie in ("twin_kl", "margin") for slack in (0, 1, 2)}
HARNESS_RULE = "default grid, twin_kl, slack 1"


def config(model: str, attack: str, rate: float, params: dict, paired_beta: str,
           n_pairs: int = 16) -> harness.RunConfig:
    common = dict(attack=attack, rate=rate, attack_params=params, defenses=["fire"], ablations=False, online=False,
                  alphas=FINE, paired_beta=paired_beta, n_pairs=n_pairs)
    if model == "cifar":
        return harness.RunConfig(model="cnn", data="cifar10", data_path="/tmp/data", width=32, epochs=6, n_eval=2000,
                                 n_clean_holdout=2000, **common)
    return harness.RunConfig(model=model, **common)


def key(e) -> tuple:
    return (tuple(e["layers"]), e["form"], e["mode"], e["tau_quantile"], e["alpha"])


class Replay:
    """One draw's candidates as repairs from all its pairs: their clean costs on the defender's
    clean images (as selection measures them) and their PA and CA, each computed once."""

    def __init__(self, model, full, clean, ref_logits, eval_clean, eval_poison):
        self.model, self.full, self.clean = model, full, clean
        self.ref_pred, self.ref_prob = ref_logits.argmax(1), torch.softmax(ref_logits, 1)
        self.eval_clean, self.eval_poison = eval_clean, eval_poison
        self.costs, self.scores = {}, {}

    def _predict(self, e, x):
        kw = {} if e["tau_quantile"] is None else {"tau_quantile": e["tau_quantile"]}
        profile = self.full[e["form"]].profile(mode=e["mode"], alpha=e["alpha"], layers=e["layers"],
                                               with_fingerprint=False, **kw)
        with fr.attached(self.model, profile):
            return fr.predict(self.model, x)

    def measure(self, e):
        if key(e) not in self.costs:
            changed, drop = sel.clean_costs(self._predict(e, self.clean), self.ref_pred, self.ref_prob)
            self.costs[key(e)] = {"clean_change": changed.mean().item(), "expected_drop": drop.mean().item()}
        e.update(self.costs[key(e)])

    def score(self, e):
        if key(e) not in self.scores:
            (xc, yc), (xp, yp) = self.eval_clean, self.eval_poison
            self.scores[key(e)] = {"PA": (self._predict(e, xp) == yp).float().mean().item(),
                                   "CA": (self._predict(e, xc) == yc).float().mean().item()}
        return self.scores[key(e)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["cnn", "vit", "cifar"])
    p.add_argument("attack")
    p.add_argument("draws", type=int, nargs="?", default=10)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--params", type=json.loads, default={}, help="the attack's parameters, as JSON")
    p.add_argument("--paired-beta", default="mean", choices=["mean", "control_variate"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="the folder to write the JSON in")
    p.add_argument("--candidates", type=int, default=None, metavar="S",
                   help="also score every candidate within S twins of the best agreement")
    p.add_argument("--pairs", type=int, default=16, metavar="N",
                   help="the defender's pairs per draw (a draw's first 16 are the 16-pair study's draw)")
    p.add_argument("--resume", action="store_true",
                   help="keep the draws already in the output JSON (same settings) and run the rest")
    args = p.parse_args()
    model_name, attack_name, draws, rate, params = args.model, args.attack, args.draws, args.rate, args.params
    cfg = config(model_name, attack_name, rate, params, args.paired_beta, args.pairs)
    ds = data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
    attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
    model, _, _ = harness.backdoored_model(cfg, ds, attack, False)
    held, (eval_clean, eval_y), (eval_poison, eval_poison_y), _ = harness.split(cfg, ds, attack)
    twins, triggered = held.pairs[0], held.pairs[1]
    # the defender's whole triggered half, in split's order (its first 16 are held.pairs)
    perm = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(cfg.seed))
    mine = perm[:len(perm) // 2]
    all_px, all_cx, _ = attacks_mod.poisoned_test_set(ds.x_test[mine], ds.y_test[mine], attack)
    if not torch.equal(all_px[:len(triggered)], triggered):  # a trigger drawn at random per call
        all_px, all_cx = triggered, twins
    layers = cfg.layers or models_mod.MODELS[cfg.model].REPAIRABLE
    ref_logits = fr.logits(model, held.clean)
    n = cfg.n_pairs
    out = {"model": model_name, "attack": attack_name, "rate": rate, "params": params, "n_pairs": n,
           "paired_beta": args.paired_beta,
           "n_eval_poison": len(eval_poison_y), "n_eval_clean": len(eval_y), "draws": []}
    cv = "-cv" if args.paired_beta == "control_variate" else ""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{model_name}-{attack_name}{cv}{'' if n == 16 else f'-{n}pairs'}.json"
    if args.resume and path.exists():  # a draw depends on its index alone, so the rest can follow
        done = json.loads(path.read_text())
        if {k: v for k, v in done.items() if k != "draws"} != {k: v for k, v in out.items() if k != "draws"}:
            raise SystemExit(f"{path} was written with other settings; not resuming it")
        if args.candidates is not None and any("candidates" not in r for r in done["draws"]):
            raise SystemExit(f"{path}'s draws were run without --candidates; not resuming it")
        out["draws"] = done["draws"]
    for d in range(len(out["draws"]), draws):
        t = time.time()
        idx = torch.arange(n) if d == 0 else torch.randperm(len(all_px), generator=torch.Generator().manual_seed(d))[:n]
        cfg_d = dataclasses.replace(cfg, seed=cfg.seed + d)  # the estimators' and folds' seed only
        held_d = harness.Held(clean=held.clean, pairs=(all_cx[idx], all_px[idx]), flagged=held.flagged)
        fitted = harness.FireDefense(harness.SELECTED_MODES).fit(model, held.clean, held_d, cfg_d, layers)
        evidence = [e for e in fitted.selection.evidence if "error" not in e]
        full = {}
        fit_cfg = harness.fit_config(cfg_d, model, layers, harness.SELECTED_MODES)
        for est in fr.estimators(model, layers, fit_cfg, held.clean[:2]):
            est.observe(held.clean, poisoned=False)
            est.observe_pairs(*held_d.pairs)
            full[est.form] = est
        replay = Replay(model, full, held.clean, ref_logits, (eval_clean, eval_y), (eval_poison, eval_poison_y))
        row = {"draw": d, "pairs": idx.tolist(), "rules": {}}
        for name, (alphas, tie, slack) in RULES.items():
            # every clean cost measured here, by one estimator per form (none carried over from the fit)
            pool = [{**e, **replay.costs.get(key(e), dict.fromkeys(sel.CLEAN_COSTS))} for e in evidence
                    if e["alpha"] in alphas]
            e = sel.choose(pool, cfg.max_clean_change, replay.measure, n, tie, cfg.clean_cost, slack)
            row["rules"][name] = {"choice": list(key(e)), "agreement": e["agreement"], "twin_kl": e["twin_kl"],
                                  "margin": e["margin"], **replay.score(e)}
        if args.candidates is not None:
            row["candidates"], top = [], None  # top: the best agreement that keeps the clean limit
            for e in sorted(({**e} for e in evidence if e["alpha"] in FINE), key=lambda e: -e["agreement"]):
                if top is not None and round(e["agreement"] * n) < top - args.candidates:
                    break
                replay.measure(e)
                if e[cfg.clean_cost] <= cfg.max_clean_change:
                    top = round(e["agreement"] * n) if top is None else top
                    row["candidates"].append({"choice": list(key(e)), **{k: e[k] for k in (
                        "agreement", "twin_kl", "margin", "clean_change", "expected_drop")}, **replay.score(e)})
        out["draws"].append(row)
        path.write_text(json.dumps(out, indent=1))
        r = row["rules"]
        print(f"{model_name} {attack_name}{cv} ({n} pairs) draw {d}: " + ", ".join(
            f"{name}: {100 * r[name]['PA']:.1f}" for name in (HARNESS_RULE, "fine grid, margin, slack 1")) +
              f" ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
