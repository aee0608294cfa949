"""Where a trigger token's shift lies in the ViT's token features, block by block: the class
token, the trigger's own token, the other tokens; and how much of the flattened direction
(the pairs' mean difference over all tokens) sits at fixed positions.

    python benchmarks/results/digits-vit-trigger-token/where.py vit      # needs the cached model
    python benchmarks/results/digits-vit-trigger-token/where.py vit-gap
"""
import sys

import torch

from fire_repair.eval import attacks, harness
from fire_repair.eval import data as data_mod

model_name = sys.argv[1] if len(sys.argv) > 1 else "vit"
cfg = harness.RunConfig(attack="token", model=model_name)
ds = data_mod.load("digits", None, seed=0)
attack = attacks.build("token")
model, cached, _ = harness.backdoored_model(cfg, ds, attack, False)
held, *_ = harness.split(cfg, ds, attack)
twins, triggered = held.pool  # the defender's half: every triggered image with its twin
twins, triggered = twins[:64], triggered[:64]
feats = {}
hooks = [getattr(model, b).register_forward_hook(lambda m, i, o, b=b: feats.__setitem__(b, o)) for b in model.BLOCKS]
with torch.no_grad():
    model(twins)
    clean = dict(feats)
    model(triggered)
    poisoned = dict(feats)
for h in hooks:
    h.remove()
first = 1 if model.CLASS_TOKEN else 0  # the patch tokens
print(f"{model_name} ({'cached' if cached else 'trained now'}), 64 pairs of the defender's half; mean per-sample "
      "norm of the shift (triggered minus twin) at:")
print("| block | class token | trigger's token (largest patch token) | other patch tokens (median) | "
      "flattened direction's energy at the class token | at the 8 largest positions of the mean |")
print("|---|---:|---:|---:|---:|---:|")
for b in model.BLOCKS:
    d = poisoned[b] - clean[b]  # (N, T, C)
    norms = d.norm(dim=2)
    beta = d.mean(0)  # the flattened mean difference, per token
    energy = beta.norm(dim=1) ** 2 / beta.norm() ** 2
    cls = f"{norms[:, 0].mean():.2f}" if model.CLASS_TOKEN else "-"
    at_cls = f"{100 * energy[0]:.0f} %" if model.CLASS_TOKEN else "-"
    top8 = energy.sort(descending=True).values[:8].sum()
    print(f"| {b} | {cls} | {norms[:, first:].amax(1).mean():.2f} | {norms[:, first:].median():.2f} | {at_cls} | "
          f"{100 * top8:.0f} % |")
