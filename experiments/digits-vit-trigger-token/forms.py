"""Each form on its own: paired FIRE's headline (`fire`: layer, mode, tau and alpha chosen
without labels from 16 pairs) restricted to the flattened form, then to the per-position form,
on the trigger token, with 6 draws of the defender's pairs. The harness's `form=` ablation keeps
the other form's mode, tau and alpha, which is no fair test of a form; this is.

    OMP_NUM_THREADS=1 python experiments/digits-vit-trigger-token/forms.py vit      # or vit-gap
    OMP_NUM_THREADS=1 python experiments/digits-vit-trigger-token/forms.py vit cifar10  # images in /tmp/data
Writes forms-<model>.json here, or forms-vit-cifar10.json in ../cifar10-vit-trigger-token/ (rows
and draws per form), and prints a table. A third argument names the JSON apart (forms-vit-TAG.json):
the runs of 2026-12-01, with the ViT's `tokens` layer among the candidates, are tagged `tokens`.
"""
import json
import statistics
import sys
import time
from pathlib import Path

from fire_eval import harness

model = sys.argv[1] if len(sys.argv) > 1 else "vit"
data = sys.argv[2] if len(sys.argv) > 2 else "digits"
# CIFAR-10: the recipe of ../cifar10-vit-trigger-token/ (20 epochs, 2000 + 2000 images)
recipe = dict(data="cifar10", data_path="/tmp/data", epochs=20, n_eval=2000, n_clean_holdout=2000) \
    if data == "cifar10" else {}
draws = 6
out, t0 = {}, time.perf_counter()
for form in ("flattened", "per_position"):
    cfg = harness.RunConfig(attack="token", model=model, forms=[form], defenses=["none", "fire"],
                            ablations=False, online=False, pair_draws=draws, **recipe)
    res = harness.run(cfg, progress=False, log=print)
    keep = ("CA", "ASR", "PA", "layers", "form", "mode", "tau_quantile", "alpha")
    out[form] = {"rows": [{"defense": r["defense"], **{k: r.get(k) for k in keep}} for r in res["rows"]],
                 "draws": res["pair_draws"]["draws"]}
print(f"\n{model} on {data}, trigger token, each form chosen on its own ({time.perf_counter() - t0:.0f} s):\n")
print("| form | PA % (draw 0) | chosen (draw 0) | PA mean % over 6 draws | worst | best | CA % |")
print("|---|---:|---|---:|---:|---:|---:|")
for form, r in out.items():
    fire = next(row for row in r["rows"] if row["defense"] == "fire")
    pa = [100 * d["PA"] for d in r["draws"]]
    q = "" if fire["tau_quantile"] is None else f" (tau q {fire['tau_quantile']:g})"
    chosen = f"{'+'.join(fire['layers'])}, {fire['mode']}{q}, alpha {fire['alpha']:g}"
    print(f"| {form} | {100 * fire['PA']:.1f} | {chosen} | {statistics.mean(pa):.1f} | {min(pa):.1f} | {max(pa):.1f} | "
          f"{100 * fire['CA']:.1f} |")
here = Path(__file__).parent
where = here if data == "digits" else here.parent / "cifar10-vit-trigger-token"
tag = "".join(f"-{t}" for t in ([] if data == "digits" else [data]) + sys.argv[3:4])
(where / f"forms-{model}{tag}.json").write_text(json.dumps(out, indent=1))
