"""Paired FIRE's headline (`fire`) on the trigger token with and without the ViT's `tokens`
layer among the candidates, on the same model and pairs, with 6 draws of the defender's pairs:
what the layer before attention adds, apart from any retraining.

    OMP_NUM_THREADS=1 python experiments/digits-vit-trigger-token/layers.py vit-gap      # digits
    OMP_NUM_THREADS=1 python experiments/digits-vit-trigger-token/layers.py vit cifar10  # images in /tmp/data
Writes layers-<model>[-cifar10].json beside forms.py's output and prints a table.
"""
import json
import statistics
import sys
import time
from pathlib import Path

from fire_eval import harness, models

model = sys.argv[1] if len(sys.argv) > 1 else "vit"
data = sys.argv[2] if len(sys.argv) > 2 else "digits"
recipe = dict(data="cifar10", data_path="/tmp/data", epochs=20, n_eval=2000, n_clean_holdout=2000) \
    if data == "cifar10" else {}
every = models.MODELS[model].REPAIRABLE
candidates = {"without tokens": [n for n in every if n != "tokens"], "with tokens": list(every)}
out, t0 = {}, time.perf_counter()
for what, layers in candidates.items():
    cfg = harness.RunConfig(attack="token", model=model, layers=layers, defenses=["none", "fire"],
                            ablations=False, online=False, pair_draws=6, **recipe)
    res = harness.run(cfg, progress=False, log=print)
    fire = next(r for r in res["rows"] if r["defense"] == "fire")
    keep = ("CA", "ASR", "PA", "layers", "form", "mode", "tau_quantile", "alpha")
    out[what] = {"candidates": layers, "fire": {k: fire.get(k) for k in keep}, "draws": res["pair_draws"]["draws"]}
print(f"\n{model} on {data}, trigger token, the headline with and without `tokens` "
      f"({time.perf_counter() - t0:.0f} s):\n")
print("| candidates | PA % (draw 0) | chosen (draw 0) | PA mean % over 6 draws | worst | best | CA % |")
print("|---|---:|---|---:|---:|---:|---:|")
for what, r in out.items():
    f, pa = r["fire"], [100 * d["PA"] for d in r["draws"]]
    q = "" if f["tau_quantile"] is None else f" (tau q {f['tau_quantile']:g})"
    form = ", per position" if f["form"] == "per_position" else ""
    print(f"| {what} | {100 * f['PA']:.1f} | {'+'.join(f['layers'])}{form}, {f['mode']}{q}, alpha {f['alpha']:g} | "
          f"{statistics.mean(pa):.1f} | {min(pa):.1f} | {max(pa):.1f} | {100 * f['CA']:.1f} |")
here = Path(__file__).parent
where = here if data == "digits" else here.parent / "cifar10-vit-trigger-token"
(where / f"layers-{model}{'' if data == 'digits' else '-' + data}.json").write_text(json.dumps(out, indent=1))
