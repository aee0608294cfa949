"""The ViT's Blended row (embedded digits, `fire`, paired) under changes to what the defender
holds and to the selection grid, one harness run each (models from the cache). Run from the
repository root:

    python experiments/digits-vit-blended-selection/sweep.py [VARIANT ...] > sweep.log
"""
import sys
import time

import torch

from fire_eval import harness

torch.set_num_threads(1)
FINE = [0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
# The harness's rule when this sweep was recorded (before the switch to steps of 0.25 and the
# control-variate beta, ../selection-draws/); each variant changes it
RECORDED = {"alphas": [0.5, 1.0, 1.5, 2.0, 3.0], "paired_beta": "mean"}
VARIANTS = {
    "default (16 pairs)": {},
    "8 pairs": {"n_pairs": 8},
    "32 pairs": {"n_pairs": 32},
    "64 pairs": {"n_pairs": 64},
    "k = 2": {"k": 2},
    "gate quantile 0.99": {"gate_quantile": 0.99},
    "gate quantile 0.9999": {"gate_quantile": 0.9999},
    "alphas up to 5": {"alphas": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]},
    "finer alphas": {"alphas": FINE},
    "32 pairs, finer alphas": {"n_pairs": 32, "alphas": FINE},
}
print("| variant | CA | ASR | PA | chosen | seconds |\n|---|---:|---:|---:|---|---:|")
for name in sys.argv[1:] or VARIANTS:
    cfg = harness.RunConfig(attack="blended", model="vit", defenses=["fire"], online=False, ablations=False,
                            **{**RECORDED, **VARIANTS[name]})
    t = time.perf_counter()
    row = harness.run(cfg, progress=False, log=lambda s: None)["rows"][0]
    chosen = (f"{'+'.join(row['layers'])}, {row['form']}, {row['mode']}, alpha {row['alpha']}, "
              f"tau q {row['tau_quantile']}")
    print(f"| {name} | {100 * row['CA']:.1f} | {100 * row['ASR']:.1f} | {100 * row['PA']:.1f} | {chosen} | "
          f"{time.perf_counter() - t:.0f} |", flush=True)
