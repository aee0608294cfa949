"""The backdoored models' mean clean margin (largest logit minus the next) on the defender's clean
set, for the margin-gap rule in rules.py. Run from the repository root (the models cached):

    python experiments/cifar10-jpeg-cnn32/selection-hindsight/clean_margin.py
"""
import json
import os
from pathlib import Path

from fire_eval import attacks as attacks_mod
from fire_eval import data as data_mod
from fire_eval import harness
from fire_repair import logits
from fire_repair.selection import margin

HERE = Path(os.environ.get("HINDSIGHT_DIR", Path(__file__).parent))  # where the JSON files are

ds = data_mod.load("cifar10", "/tmp/data", seed=0)
out = {}
for spec in ["badnets", "blended", "sig:0.05", "wanet::s=2.0", "trojan", "adaptive", "moving"]:
    name, rate, param = (spec.split(":") + ["", ""])[:3]
    params = {param.split("=")[0]: float(param.split("=")[1])} if param else {}
    cfg = harness.RunConfig(attack=name, model="cnn", data="cifar10", data_path="/tmp/data", width=32, epochs=6,
                            rate=float(rate) if rate else 0.1, attack_params=params, n_eval=2000, n_clean_holdout=2000)
    attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
    model, cached, _ = harness.backdoored_model(cfg, ds, attack, False)
    assert cached, name
    held, *_ = harness.split(cfg, ds, attack)
    lg = logits(model, held.clean)
    m = margin(lg, lg.argmax(1))
    out[name] = {"mean": m.mean().item(), "median": m.median().item()}
    print(name, out[name], flush=True)
HERE.joinpath("clean-margin.json").write_text(json.dumps(out, indent=1))
