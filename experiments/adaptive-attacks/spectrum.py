"""Why FIRE holds or fails on each attack: at every candidate layer of the evaluation suite's
backdoored model, the share of the trigger's displacement in its top k directions and what a
gate calibrated on clean images reaches there (fire_repair.trigger_spectrum), flattened and per
position. Measured on up to --n-pairs triggered images of the defender's half of the test set with
their twins; the gate is calibrated on the evaluation half's clean images (no twin among them)
(issue 36).

    OMP_NUM_THREADS=2 python experiments/adaptive-attacks/spectrum.py --data digits \
        --attack badnets adap-blend adap-patch latent low-amp multi --out experiments/adaptive-attacks/digits
"""
import argparse
import json
import time

import suite

import fire_repair as fr
from fire_eval import data

KS = (1, 2, 4, 8)
p = argparse.ArgumentParser()
p.add_argument("--data", default="digits")
p.add_argument("--data-path", default=None)
p.add_argument("--attack", nargs="+", required=True)
p.add_argument("--n-pairs", type=int, default=512)
p.add_argument("--out", required=True)
args = p.parse_args()
ds = data.load(args.data, args.data_path, seed=0)
rows, t0 = [], time.perf_counter()
for name in args.attack:
    c = suite.case(args.data, args.data_path, ds, name)
    model, held, x_other = c.model, c.held, c.eval_clean[0]
    twins, triggered = (x[:args.n_pairs] for x in held.pool)
    flat = model.REPAIRABLE
    positional = fr.positional_layers(model, flat, held.clean[:2], channel_dim=1)
    for form, layers in (("flattened", flat), ("per_position", positional)):
        for r in fr.trigger_spectrum(model, layers, triggered, twins, x_other, ks=KS,
                                     per_position=form == "per_position"):
            rows.append({"attack": name, "form": form, **r})
            print(json.dumps(rows[-1]), flush=True)

with open(f"{args.out}/spectrum.json", "w") as f:
    json.dump({"data": args.data, "n_pairs": args.n_pairs, "ks": KS, "rows": rows,
               "wall_s": round(time.perf_counter() - t0, 1)}, f, indent=1)
head = ["attack", "form", "layer", "dim", "amplitude", *(f"share@{k}" for k in KS), *(f"reach@{k}" for k in KS)]
with open(f"{args.out}/spectrum.md", "w") as f:
    f.write("| " + " | ".join(head) + " |\n|" + "---|" * 3 + "---:|" * (len(head) - 3) + "\n")
    for r in rows:
        f.write("| " + " | ".join(str(r[h]) if isinstance(r[h], (str, int)) else f"{r[h]:.3f}" for h in head) + " |\n")
    f.write("\nshare@k: the trigger's displacement energy in its top k directions; reach@k: triggered images over "
            f"the clean 0.99 quantile of the largest |z| along them; amplitude: mean squared displacement / clean "
            f"total variance. {args.n_pairs} pairs at most; fire_repair.trigger_spectrum.\n")
print(f"wrote {args.out}/spectrum.md ({time.perf_counter() - t0:.0f} s)")
