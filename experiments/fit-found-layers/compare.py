"""fr.fit with its defaults on the evaluation suite's cached CIFAR-10 model: the layers it finds
in the model with the pixels offered (`input`, an identity, as `fr.with_input_layer` adds) and
without them (what a model without such an identity gave before 0.3), against the harness's
hand-named layers. Run from the repository root, after `fire-eval eval` trained the model:

    OMP_NUM_THREADS=1 python experiments/fit-found-layers/compare.py --data-path DIR --attack badnets
"""
import argparse
import json
import time

import fire_repair as fr
from fire_eval import attacks, data, harness, metrics, models

p = argparse.ArgumentParser()
p.add_argument("--data-path", required=True)
p.add_argument("--attack", default="badnets")
p.add_argument("--out", default=None)
args = p.parse_args()
cfg = harness.RunConfig(attack=args.attack, model="cnn", data="cifar10", data_path=args.data_path, width=32,
                        epochs=6, n_eval=2000, n_clean_holdout=2000, online=False, ablations=False)
ds = data.load(cfg.data, cfg.data_path, seed=cfg.seed)
attack = attacks.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
model, cached, _ = harness.backdoored_model(cfg, ds, attack, progress=False)
assert cached, "train the model first with fire-eval eval (see experiments/README.md)"
held, (xc, yc), (xp, yp), _ = harness.split(cfg, ds, attack)
found = fr.candidate_layers(model, held.clean[:2])
rows = []
for name, layers in (("found, pixels offered", found), ("found, no pixels", [n for n in found if n != "input"]),
                     ("harness's hand-named", list(models.MODELS["cnn"].REPAIRABLE))):
    t = time.perf_counter()
    res = fr.fit(model, held.clean, pairs=held.pairs, layers=layers)
    with fr.attached(model, res.profile):
        r = metrics.rates(fr.predict(model, xc), yc, fr.predict(model, xp), yp, attack.target)
    rows.append({"layers offered": name, "layers": layers, **r, "choice": res.choice,
                 "seconds": round(time.perf_counter() - t)})
    print(json.dumps(rows[-1], default=str), flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1, default=str)
