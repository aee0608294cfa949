"""Experiment: per-token centres for per-position FIRE on the digits ViT (Blended / BadNets)."""
import sys
from collections import OrderedDict

import torch
from torch import nn

import fire_repair as fr
from fire_eval import attacks, data, harness
from fire_eval.metrics import predict

attack_name = sys.argv[1] if len(sys.argv) > 1 else "blended"
cfg = harness.RunConfig(attack=attack_name, model="vit", defenses=[])
ds = data.load("digits", None, seed=0)
attack = attacks.build(attack_name, target=0, seed=0)
model, cached, _ = harness.backdoored_model(cfg, ds, attack, progress=False)
held, (ec, ey), (ep, epy), _ = harness.split(cfg, ds, attack)
print("cached", cached, "CA", (predict(model, ec) == ey).float().mean().item(),
      "PA none", (predict(model, ep) == epy).float().mean().item())


class Add(nn.Module):
    def __init__(self, m, sign):
        super().__init__()
        self.register_buffer("m", m)
        self.sign = sign

    def forward(self, x):
        return x + self.sign * self.m


def score(profile):
    with fr.attached(model, profile):
        ca = (predict(model, ec) == ey).float().mean().item()
        pa = (predict(model, ep) == epy).float().mean().item()
    return ca, pa


for block in ["block1", "block2", "block3", "block4"]:
    orig = getattr(model, block)
    acts = []
    h = orig.register_forward_hook(lambda m, i, o, acts=acts: acts.append(o))
    with torch.no_grad():
        model.eval()(held.clean)
    h.remove()
    M = torch.cat(acts).mean(0)  # (T, C)
    for variant in ("shared centre", "per-token centre"):
        if variant == "per-token centre":
            setattr(model, block, nn.Sequential(OrderedDict(inner=orig, centred=Add(M, -1), restore=Add(M, 1))))
            layer = f"{block}.centred"
        else:
            setattr(model, block, orig)
            layer = block
        est = fr.Estimator(model, [layer], k=1, per_position=True, channel_dim=-1)
        est.observe(held.clean, poisoned=False)
        est.observe_pairs(*held.pairs)
        for mode in ("clamp", "gated"):
            for alpha in (1.0, 2.0, 3.0):
                q = 0.999 if mode == "gated" else 0.99
                ca, pa = score(est.profile(mode=mode, alpha=alpha, tau_quantile=q))
                print(f"{attack_name} {block} {variant:16s} {mode:6s} alpha {alpha}: CA {100*ca:.1f} PA {100*pa:.1f}",
                      flush=True)
    setattr(model, block, orig)
