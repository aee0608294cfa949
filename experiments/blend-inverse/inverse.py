"""The op's mode invert at one layer, fixed (no selection): alpha 1, tau at the clean 0.999
quantile, beta and slope g from the defender's 16 pairs and clean set (fr.Estimator,
`profile(mode="invert")`), at `input` (the pixels) and the ViT's `tokens`, over 6 draws of the
pairs. Where the gate flags a row: x -> mu + (x - mu - beta) / (1 + g). This script first
emulated that map with a forward hook in plain PyTorch (the logs `vit-*.log` of 2026-12-01);
since 2026-12-02 it attaches the op's mode (`op-*.log`).

    OMP_NUM_THREADS=1 python experiments/blend-inverse/inverse.py vit digits      # or vit cifar10
A third argument, a JPEG quality, compresses every triggered image (the defender's and the
evaluation's) after blending: a blend that is no longer exact.
"""
import sys

import fire_repair as fr
from fire_eval import attacks, harness
from fire_eval import data as data_mod
from fire_eval.baselines import JPEG
from fire_eval.metrics import predict

model_name = sys.argv[1] if len(sys.argv) > 1 else "vit"
data = sys.argv[2] if len(sys.argv) > 2 else "digits"
recipe = dict(data="cifar10", data_path="/tmp/data", epochs=20, n_eval=2000, n_clean_holdout=2000) \
    if data == "cifar10" else {}
cfg = harness.RunConfig(attack="blended", model=model_name, **recipe)
ds = data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
attack = attacks.build(cfg.attack, target=cfg.target, seed=cfg.seed)
model, cached, _ = harness.backdoored_model(cfg, ds, attack, progress=False)
assert cached, "train the model first (fire-repair eval with the same recipe)"
held, (xc, yc), (xp, yp), _ = harness.split(cfg, ds, attack)
if len(sys.argv) > 3:  # the triggered images JPEG-compressed after blending
    jpeg = JPEG(quality=int(sys.argv[3])).transform
    xp = jpeg(xp)
    pool = (held.pool[0], jpeg(held.pool[1]))
    held = harness.Held(clean=held.clean, pairs=tuple(p[:16] for p in pool), flagged=held.flagged, pool=pool)


def inverse_profile(layer, pairs):
    """Mode invert at `layer`, estimated from `pairs` and the clean set; and its slope g."""
    est = fr.Estimator(model, [layer], k=1)  # invert takes the control-variate beta itself
    est.observe(held.clean, poisoned=False)
    est.observe_pairs(*pairs)
    profile = est.profile(mode="invert", alpha=1.0, tau_quantile=0.999, layers=[layer])
    return profile, float(profile.layer(layer).slope[0])


print(f"{model_name} {data} Blended, undefended: CA {100 * (predict(model, xc) == yc).float().mean().item():.1f}  "
      f"PA {100 * (predict(model, xp) == yp).float().mean().item():.1f}", flush=True)
for layer in ("input", "tokens"):
    pas = []
    for draw in range(6):  # draw 0: the harness's own 16 pairs; then other draws of 16
        profile, g = inverse_profile(layer, held.drawn(draw, 16).pairs if draw else held.pairs)
        with fr.attached(model, profile):
            ca = (predict(model, xc) == yc).float().mean().item()
            pa = (predict(model, xp) == yp).float().mean().item()
        pas.append(pa)
        print(f"{model_name} {data} Blended, invert at {layer}, draw {draw} (g = {g:.3f}): "
              f"CA {100 * ca:.1f}  PA {100 * pa:.1f}", flush=True)
    print(f"{model_name} {data} Blended, invert at {layer}: PA mean {100 * sum(pas) / len(pas):.1f}, "
          f"worst {100 * min(pas):.1f} over 6 draws of the pairs")
