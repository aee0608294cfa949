"""The ViT's Blended row (embedded digits) against what an input-space shift can do at all, and
FIRE's repair at alphas the default grid does not hold. Run from the repository root (models
from the cache; about a minute):

    D=experiments/digits-vit-blended-selection; python $D/oracle.py > $D/oracle.log

Blended makes x' = 0.8 x + 0.2 p. A constant shift s * 0.2 (p - mu) (mu the defender's clean
mean) is the best FIRE's gated repair at the input could estimate; it leaves 0.8 x + 0.2 mu at
s = 1, the image at 80 % contrast. Printed: PA of that oracle shift over s; PA and CA of FIRE
(input, flattened, gated, clean quantile 0.999, all 16 pairs) over alpha, with the paired mean
difference as beta and with the control-variate beta (`paired_beta="control_variate"`: the
pairs' mean difference corrected for how far their clean images' mean lies from the clean mean,
by one scalar regression of the differences on the clean images, d_i = beta + g (x_i - mu);
g = -0.2 for this blend); then the
out-of-fold twin agreement that the label-free selection sees over the same alphas."""
import torch

import fire_repair as fr
from fire_eval import attacks as attacks_mod
from fire_eval import data as data_mod
from fire_eval import harness
from fire_eval.metrics import predict

torch.set_num_threads(1)
cfg = harness.RunConfig(attack="blended", model="vit", defenses=["fire"], online=False, ablations=False)
ds = data_mod.load(cfg.data, cfg.data_path, seed=cfg.seed)
attack = attacks_mod.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
model, _, _ = harness.backdoored_model(cfg, ds, attack, False)
held, (eval_clean, eval_y), (eval_poison, eval_poison_y), _ = harness.split(cfg, ds, attack)


def accuracy(x, y):
    return 100 * float(predict(model, x).eq(y).float().mean())


p = attack.pattern(eval_poison.shape[1:]).to(eval_poison)
mu = held.clean.mean(0)
print(f"{len(eval_poison_y)} triggered evaluation images (one is {100 / len(eval_poison_y):.2f} points); "
      f"CA {accuracy(eval_clean, eval_y):.1f}, PA unrepaired {accuracy(eval_poison, eval_poison_y):.1f}, "
      f"PA of the exact inverse (x' - 0.2 p) / 0.8: {accuracy((eval_poison - 0.2 * p) / 0.8, eval_poison_y):.1f}")
print("\n| s | PA of x' - s * 0.2 (p - mu) (oracle) |\n|---:|---:|")
for s in (1.0, 1.25, 1.5, 1.75, 2.0):
    print(f"| {s} | {accuracy(eval_poison - s * 0.2 * (p - mu), eval_poison_y):.1f} |")


print("\n| beta | alpha | PA | CA |\n|---|---:|---:|---:|")
for form in ("mean", "control_variate"):
    est = harness.estimator(model, ["input"], harness.RunConfig(**{**cfg.__dict__, "paired_beta": form}), "flattened")
    est.observe(held.clean, poisoned=False)
    est.observe_pairs(*held.pairs)
    if form == "control_variate":
        form += f" (g = {est.stats['input'].pair_slope():.3f})"
    for alpha in (1.0, 1.25, 1.5, 1.75, 2.0):
        with fr.attached(model, est.profile(mode="gated", alpha=alpha, tau_quantile=0.999)):
            pa, ca = accuracy(eval_poison, eval_poison_y), accuracy(eval_clean, eval_y)
        print(f"| {form} | {alpha} | {pa:.1f} | {ca:.1f} |", flush=True)

# What the label-free selection sees of the same alphas: out-of-fold agreement on the 16 twins.
est = harness.estimator(model, ["input"], cfg, "flattened")
est.observe(held.clean, poisoned=False)
sel = fr.select([est], *held.pairs, x_clean_reference=held.clean, layer_sets=[["input"]], modes=["gated"],
                alphas=[1.0, 1.25, 1.5, 1.75, 2.0], tau_quantile={"gated": [0.999]}, folds=cfg.folds, seed=cfg.seed,
                max_clean_change=cfg.max_clean_change, clean_cost=cfg.clean_cost, tie_break=cfg.tie_break,
                agreement_slack=cfg.agreement_slack)
print("\nselection over these alphas (paired mean beta; * the choice):\n")
print(sel.table())
