"""Emulation (plain PyTorch, not the op) of a repair that inverts a blend instead of shifting
by a constant: where the gate flags a row, x -> mu + (x - mu - beta) / (1 + g), with beta the
control-variate paired beta, g its slope (d_i = beta + g (c_i - mu); g = -a for a blend) and mu
the clean mean, all from the defender's 16 pairs and clean set at a linear layer (`input`, the
pixels, or the ViT's `tokens`). The gate: the projection on beta's direction beyond the clean
set's 0.999 quantile. A question for the next op mode, not a defence of the harness.

    OMP_NUM_THREADS=1 python benchmarks/results/blend-inverse/emulate.py vit digits      # or vit cifar10
A third argument, a JPEG quality, compresses every triggered image (the defender's and the
evaluation's) after blending: a blend that is no longer exact.
"""
import sys

import torch

import fire_repair as fr
from fire_repair.eval import attacks, harness
from fire_repair.eval import data as data_mod
from fire_repair.eval.baselines import JPEG
from fire_repair.eval.metrics import predict

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
modules = dict(model.named_modules())



def inverse_hook(layer, pairs):
    """The hook that inverts the blend at `layer`, estimated from `pairs` and the clean set."""
    est = fr.Estimator(model, [layer], k=1, paired_beta="control_variate")
    est.observe(held.clean, poisoned=False)
    est.observe_pairs(*pairs)
    st = est.stats[layer]
    g = st.pair_slope()
    mu, beta = st.clean_mean().float(), st.beta("paired", "control_variate").float()
    u = beta / beta.norm()
    feats = []
    h = modules[layer].register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        model(held.clean)
    h.remove()
    tau = torch.quantile((feats[0] - mu) @ u, 0.999)

    def invert(m, i, o):
        flat = o.flatten(1)
        flagged = ((flat - mu) @ u) > tau
        fixed = mu + (flat - mu - beta) / (1 + g)
        return torch.where(flagged[:, None], fixed, flat).to(o.dtype).view_as(o)
    return invert, g


print(f"{model_name} {data} Blended, undefended: CA {100 * (predict(model, xc) == yc).float().mean().item():.1f}  "
      f"PA {100 * (predict(model, xp) == yp).float().mean().item():.1f}", flush=True)
for layer in ("input", "tokens"):
    pas = []
    for draw in range(6):  # draw 0: the harness's own 16 pairs; then other draws of 16
        invert, g = inverse_hook(layer, held.drawn(draw, 16).pairs if draw else held.pairs)
        h = modules[layer].register_forward_hook(invert)
        ca = (predict(model, xc) == yc).float().mean().item()
        pa = (predict(model, xp) == yp).float().mean().item()
        h.remove()
        pas.append(pa)
        print(f"{model_name} {data} Blended, inverse at {layer}, draw {draw} (g = {g:.3f}): "
              f"CA {100 * ca:.1f}  PA {100 * pa:.1f}", flush=True)
    print(f"{model_name} {data} Blended, inverse at {layer}: PA mean {100 * sum(pas) / len(pas):.1f}, "
          f"worst {100 * min(pas):.1f} over 6 draws of the pairs")
