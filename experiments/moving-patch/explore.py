"""Where per-position FIRE loses on the moving patch: fr.fit with its defaults against other
candidate layers, k, touched, modes, on the evaluation suite's backdoored model (issue 37).

    OMP_NUM_THREADS=2 python experiments/moving-patch/explore.py --data digits [--data-path DIR]
"""
import argparse
import json
import time

from torch import nn

import fire_repair as fr
from fire_eval import attacks, baselines, data, harness, metrics

p = argparse.ArgumentParser()
p.add_argument("--data", default="digits")
p.add_argument("--data-path", default=None)
p.add_argument("--attack", default="moving")
p.add_argument("--param", action="append", default=[], help="attack parameter KEY=INT")
p.add_argument("--only", nargs="*", default=None)
p.add_argument("--out", default=None)
args = p.parse_args()
params = {k: int(v) for k, v in (s.split("=") for s in args.param)}
extra = dict(width=32, epochs=6, n_eval=2000, n_clean_holdout=2000) if args.data != "digits" else {}
cfg = harness.RunConfig(attack=args.attack, data=args.data, data_path=args.data_path, attack_params=params,
                        online=False, ablations=False, **extra)
ds = data.load(cfg.data, cfg.data_path, seed=cfg.seed)
attack = attacks.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
model, cached, _ = harness.backdoored_model(cfg, ds, attack, progress=True)
held, (xc, yc), (xp, yp), _ = harness.split(cfg, ds, attack)


def score(pred_clean, pred_poison):
    return metrics.rates(pred_clean, yc, pred_poison, yp, attack.target)


rows = []


def record(name, r, **info):
    rows.append({"option": name, **{k: round(100 * v, 2) for k, v in r.items()}, **info})
    print(json.dumps(rows[-1], default=str), flush=True)


record("none", score(fr.predict(model, xc), fr.predict(model, xp)))
clean = harness.clean_model(cfg, ds, progress=True)
record("clean-model", score(fr.predict(clean, xc), fr.predict(clean, xp)))
blur = baselines.Blur().fit(model, held.clean)

HAND = list(model.REPAIRABLE)
SUB = ["input", "block1.0.0", "block1.0.1", "block1", "block2", "block3", "fc"]
OPTIONS = {
    "recipe": dict(layers=HAND),
    "no-smoothing": dict(layers=HAND, smoothing=False),
    "smoothing-q0.999": dict(layers=HAND, smoothing_quantile=0.999),
    "tau-0.99": dict(layers=HAND, tau_quantile=(0.99,)),
    "sub-layers": dict(layers=SUB),
    "k2": dict(layers=HAND, k=2),
    "k4": dict(layers=HAND, k=4),
    "per-position-only": dict(layers=HAND, forms=("per_position",)),
    "clamp-only": dict(layers=HAND, modes=("clamp",)),
    "gated-only": dict(layers=HAND, modes=("gated",)),
    "tau-0.5-0.9": dict(layers=HAND, tau_quantile=(0.5, 0.75, 0.9)),
    "tau-0.99-0.999": dict(layers=HAND, tau_quantile=(0.99, 0.999)),
}


class Blurred(nn.Module):
    """The model behind the harness's blur: FIRE then fits on the blurred images."""

    def __init__(self, model, blur):
        super().__init__()
        self.model, self.blur = model, blur

    def forward(self, x):
        return self.model(self.blur.transform(x))


twin_pred, clean_pred = fr.predict(model, held.pairs[0]), fr.predict(model, held.clean)


def label_free(m):
    """What the defender can measure without labels, in sample: agreement of the repaired triggered
    pairs with the unrepaired model on their twins, and the share of clean predictions changed."""
    return {"agree": round((fr.predict(m, held.pairs[1]) == twin_pred).float().mean().item(), 4),
            "clean_change": round((fr.predict(m, held.clean) != clean_pred).float().mean().item(), 4)}


record("blur", score(blur.predict(xc), blur.predict(xp)), **label_free(Blurred(model, blur)))
OPTIONS["blur+recipe"] = dict(layers=[f"model.{n}" for n in HAND], wrap=True)
for name, kw in OPTIONS.items():
    if args.only and name not in args.only:
        continue
    t = time.perf_counter()
    m = Blurred(model, blur) if kw.pop("wrap", False) else model
    try:
        res = fr.fit(m, held.clean, pairs=held.pairs, **kw)
    except Exception as e:  # an option the op cannot take is a result too
        record(name, {}, error=repr(e))
        continue
    with fr.attached(m, res.profile):
        r = score(fr.predict(m, xc), fr.predict(m, xp))
        lf = label_free(m)
    record(name, r, choice=res.choice, seconds=round(time.perf_counter() - t), **lf,
           smoothing=res.profile.info.get("smoothing"))
if args.out:
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1, default=str)
