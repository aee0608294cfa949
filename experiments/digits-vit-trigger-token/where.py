"""Where a trigger token's shift lies in the ViT's token features, block by block: the class
token, the trigger's own token (the cell whose pixels differ), the other patch tokens; and how
much of the flattened direction (the pairs' mean difference over all tokens) sits at the class
token.

    python experiments/digits-vit-trigger-token/where.py vit      # needs the cached model
    python experiments/digits-vit-trigger-token/where.py vit-gap
    python experiments/digits-vit-trigger-token/where.py vit cifar10   # images in /tmp/data
"""
import sys

import torch

from fire_eval import attacks, harness
from fire_eval import data as data_mod

model_name = sys.argv[1] if len(sys.argv) > 1 else "vit"
data = sys.argv[2] if len(sys.argv) > 2 else "digits"
if data == "cifar10":  # the recipe of ../cifar10-vit-trigger-token/
    cfg = harness.RunConfig(attack="token", model=model_name, data="cifar10", data_path="/tmp/data", epochs=20,
                            n_eval=2000, n_clean_holdout=2000)
    ds = data_mod.load("cifar10", "/tmp/data", seed=0, cache_dir=".fire-cache")
else:
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
# the trigger's own token: the 4x4 cell whose pixels differ (tokens are the cells in row-major order)
cell = (triggered != twins).any(1).reshape(-1, 8, 4, 8, 4).any(4).any(2).flatten(1).float().argmax(1) + first
print(f"{model_name} on {data} ({'cached' if cached else 'trained now'}), 64 pairs of the defender's half; mean "
      "per-sample norm of the shift (triggered minus twin) at:")
print("| block | class token | the trigger's own token | largest other patch token | other patch tokens (median) | "
      "flattened direction's energy at the class token |")
print("|---|---:|---:|---:|---:|---:|")
rows = torch.arange(len(cell))
for b in model.BLOCKS:
    d = poisoned[b] - clean[b]  # (N, T, C)
    norms = d.norm(dim=2)
    own = norms[rows, cell]
    others = norms.clone()
    others[rows, cell] = float("nan")
    others = others[:, first:]
    beta = d.mean(0)  # the flattened mean difference, per token
    energy = beta.norm(dim=1) ** 2 / beta.norm() ** 2
    cls = f"{norms[:, 0].mean():.2f}" if model.CLASS_TOKEN else "-"
    at_cls = f"{100 * energy[0]:.0f} %" if model.CLASS_TOKEN else "-"
    print(f"| {b} | {cls} | {own.mean():.2f} | {others.nan_to_num(-1).amax(1).mean():.2f} | "
          f"{others.nanmedian():.2f} | {at_cls} |")
