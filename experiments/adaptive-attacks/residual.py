"""Where paired FIRE's residual ASR comes from (issue 36). For each attack, on the evaluation
suite's backdoored model: FIRE fitted as the harness's `fire` row fits it (fr.fit, the harness's
candidates, the defender's 16 pairs), then each triggered evaluation image that FIRE leaves at
the target is put in one of three groups:

- `floor`: the never-poisoned model (harness's clean-model reference) calls it the target too;
- `missed`: no repaired layer's projection passed tau (the repair left the image as it was);
- `under`: the repair moved it, not far enough.

    OMP_NUM_THREADS=2 python experiments/adaptive-attacks/residual.py --data cifar10 --data-path DIR \
        --attack adap-blend adap-patch --out experiments/adaptive-attacks/cifar10
"""
import argparse
import json
import time

import suite
import torch

import fire_repair as fr
from fire_eval import data, harness

p = argparse.ArgumentParser()
p.add_argument("--data", default="digits")
p.add_argument("--data-path", default=None)
p.add_argument("--attack", nargs="+", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
ds = data.load(args.data, args.data_path, seed=0)
rows, t0 = [], time.perf_counter()


def repaired(model, profile, x) -> tuple:
    """(predictions, touched), one pass of x through the model repaired by `profile`: touched[i]
    is whether some repaired layer's projection of image i passed its tau (any direction, any
    position)."""
    preds, hit = [], []
    with fr.attached(model, profile), fr.capture(model) as cap:
        for i in range(0, x.shape[0], 256):
            preds.append(fr.predict(model, x[i:i + 256]))
            part = torch.zeros(preds[-1].shape[0], dtype=torch.bool)
            for layer in profile.layers:
                c = cap.projections[layer.name]
                over = (c > layer.tau.to(c.dtype)) if layer.tau is not None else torch.ones_like(c, dtype=torch.bool)
                part |= over.reshape(over.shape[0], -1).any(1).cpu()
            hit.append(part)
    return torch.cat(preds), torch.cat(hit)


for name in args.attack:
    c = suite.case(args.data, args.data_path, ds, name)
    cfg, attack, model, held, (xp, yp) = c.cfg, c.attack, c.model, c.held, c.eval_poison
    clean_model = harness.clean_model(cfg, ds, progress=True)
    fit = fr.fit(model, held.clean, pairs=held.pairs,
                 config=harness.fit_config(cfg, model, model.REPAIRABLE, harness.SELECTED_MODES))
    after, hit = repaired(model, fit.profile, xp)
    floor = fr.predict(clean_model, xp) == attack.target
    left = after == attack.target
    n = len(yp)
    row = {"attack": name, "choice": fit.choice, "n": n, "asr_after": left.double().mean().item(),
           "clean_model_asr": floor.double().mean().item(), "touched": hit.double().mean().item(),
           "left_floor": (left & floor).double().mean().item(),
           "left_missed": (left & ~floor & ~hit).double().mean().item(),
           "left_under": (left & ~floor & hit).double().mean().item()}
    rows.append(row)
    print(json.dumps(row, default=str), flush=True)

with open(f"{args.out}/residual.json", "w") as f:
    json.dump({"data": args.data, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}, f, indent=1, default=str)
with open(f"{args.out}/residual.md", "w") as f:
    f.write("| attack | FIRE's choice | ASR after % | clean-model ASR % | touched % "
            "| left: floor / missed / under % |\n|---|---|---:|---:|---:|---|\n")
    for r in rows:
        c = r["choice"]
        what = f"{'+'.join(c['layers'])}, {c['form']}, {c['mode']}, alpha {c['alpha']}"
        f.write(f"| {r['attack']} | {what} | {100 * r['asr_after']:.2f} | {100 * r['clean_model_asr']:.2f} | "
                f"{100 * r['touched']:.1f} | {100 * r['left_floor']:.2f} / {100 * r['left_missed']:.2f} / "
                f"{100 * r['left_under']:.2f} |\n")
    f.write("\nleft: triggered images FIRE leaves at the target that the never-poisoned model also calls the target "
            "(floor), that no repaired layer's projection passed tau at (missed), and that the repair moved, not far "
            "enough (under). touched: triggered images with some projection past tau.\n")
print(f"wrote {args.out}/residual.md ({time.perf_counter() - t0:.0f} s)")
