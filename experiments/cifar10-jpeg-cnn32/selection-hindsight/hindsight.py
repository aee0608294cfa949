"""Every paired selection candidate's PA in hindsight on the CIFAR-10 evaluation half, to judge
selection rules (not part of the library). Run from the repository root:

    python experiments/cifar10-jpeg-cnn32/selection-hindsight/hindsight.py ATTACK RATE PARAMS_JSON [unpaired]

e.g. `adaptive 0.1 '{}'`, `sig 0.05 '{}'`, `wanet 0.1 '{"s": 2.0}'`. Writes ATTACK.json beside this
file (or in the folder that the environment variable HINDSIGHT_DIR names): the harness's `fire`
choice and, for each candidate within 0.2 of the best out-of-fold agreement, its evidence with
PA and CA on the evaluation half and its clean costs on the defender's clean set (the repair
estimated from all 16 pairs, as selection measures them).
With `unpaired`: `fire-clamp-unpaired` (64 flagged images, no twins), candidates within 0.3,
written to ATTACK-unpaired.json. With `vit` instead: the embedded digits' ViT (the demo's recipe),
every candidate, written to ../../digits-vit-blended-selection/ATTACK.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

import fire_repair as fr
from fire_eval import attacks as attacks_mod
from fire_eval import data as data_mod
from fire_eval import harness
from fire_eval import models as models_mod
from fire_repair import logits, predict

attack_name, rate, params = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
vit = sys.argv[4:] == ["vit"]  # the digits ViT instead (every candidate kept: see below)
# The harness's rule when these files were recorded (before the switch to steps of 0.25 and the
# control-variate beta, ../../selection-draws/), so that a re-run reproduces them
recorded = dict(alphas=[0.5, 1.0, 1.5, 2.0, 3.0], paired_beta="mean")
if vit:
    cfg = harness.RunConfig(attack=attack_name, model="vit", rate=rate, attack_params=params,
                            defenses=["none", "fire"], ablations=False, online=False, **recorded)
else:
    cfg = harness.RunConfig(attack=attack_name, model="cnn", data="cifar10", data_path="/tmp/data", width=32,
                            epochs=6, rate=rate, attack_params=params, n_eval=2000, n_clean_holdout=2000,
                            defenses=["none", "fire"], ablations=False, online=False, **recorded)
ds = data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
model, _, _ = harness.backdoored_model(cfg, ds, attack, False)
held, (eval_clean, eval_y), (eval_poison, eval_poison_y), _ = harness.split(cfg, ds, attack)
layers = models_mod.MODELS[cfg.model].REPAIRABLE
t = time.time()
unpaired = sys.argv[4:] == ["unpaired"]
defense = harness.FireDefense(("clamp",), paired=False) if unpaired else harness.FireDefense(harness.SELECTED_MODES)
chosen = defense.fit(model, held.clean, held, cfg, layers)
print("fit", time.time() - t, chosen.report()["layers"], chosen.selection.mode, flush=True)
# full estimators per form, as selection builds
ests = fr.estimators(model, layers, harness.fit_config(cfg, model, layers, harness.SELECTED_MODES), held.clean[:2])
clean_ref, _ = harness.clean_reference(model, held.clean, held.flagged, cfg.match_clean)
for est in ests:  # what the selection's full estimator observed
    if unpaired:
        est.observe(clean_ref, poisoned=False)
        est.observe(held.flagged, poisoned=True)
    else:
        est.observe(held.clean, poisoned=False)
        est.observe_pairs(*held.pairs)
by_form = {e.form: e for e in ests}
evidence = [e for e in chosen.selection.evidence if "error" not in e]
best = max(e["agreement"] for e in evidence)
ref_logits = logits(model, held.clean)
ref, ref_prob = ref_logits.argmax(1), torch.softmax(ref_logits, 1)
rows = torch.arange(len(ref))
out = []
for e in sorted(evidence, key=lambda e: -e["agreement"]):
    if not vit and e["agreement"] < best - (0.3 if unpaired else 0.2):
        continue
    kw = {} if e["tau_quantile"] is None else {"tau_quantile": e["tau_quantile"]}
    prof = by_form[e["form"]].profile(mode=e["mode"], alpha=e["alpha"], layers=e["layers"], with_fingerprint=False,
                                      **kw)
    with fr.attached(model, prof):
        pa = (predict(model, eval_poison) == eval_poison_y).float().mean().item()
        ca = (predict(model, eval_clean) == eval_y).float().mean().item()
        new = predict(model, held.clean)
    out.append({**e, "pa": pa, "ca": ca, "clean_change_all": (new != ref).float().mean().item(),
                "expected_drop_all": (ref_prob[rows, ref] - ref_prob[rows, new]).mean().item()})
report = {k: v for k, v in chosen.report().items() if k != "evidence"}
folder = Path(__file__).parents[1 if vit else 0]
folder = folder.with_name("digits-vit-blended-selection") if vit else Path(os.environ.get("HINDSIGHT_DIR", folder))
path = folder / f"{attack_name}{'-unpaired' if unpaired else ''}.json"
path.write_text(json.dumps({"chosen": report, "candidates": out}, default=float))
print("done", time.time() - t)
