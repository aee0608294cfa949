"""Why unpaired FIRE falls short of paired on an attack: its candidates as the label-free
criterion saw them against what they do on the evaluation half (issue 36).

For each attack, on the evaluation suite's backdoored model, unpaired FIRE is fitted as the
harness's `fire-unpaired` row fits it (fr.fit with the 64 flagged images). The --top candidates
by agreement (the share of held-out flagged images moved off the inferred target, minus the
total variation from the clean class histogram) are rebuilt from all the flagged images, as the
chosen one is, and measured on the evaluation half: CA, PA, ASR. If the candidates within the
agreement slack span a wide range of PA, the criterion cannot see the difference there.

    OMP_NUM_THREADS=2 python experiments/adaptive-attacks/unpaired_candidates.py --data cifar10 \
        --data-path DIR --attack multi wanet --attack-param wanet:s=2.0 --out experiments/adaptive-attacks/cifar10

(--clamp-tau-quantile 0.9 --name NAME: offer clamp at a lower tau, as paired selection may choose.)
"""
import argparse
import dataclasses
import json
import time

import suite

import fire_repair as fr
from fire_eval import data, harness

p = argparse.ArgumentParser()
p.add_argument("--data", default="digits")
p.add_argument("--data-path", default=None)
p.add_argument("--attack", nargs="+", required=True)
p.add_argument("--attack-param", action="append", default=[], metavar="ATTACK:KEY=VALUE")
p.add_argument("--top", type=int, default=20)
p.add_argument("--clamp-tau-quantile", type=float, nargs="+", default=None,
               help="clamp's tau quantile candidates instead of the harness's (unpaired keeps the highest)")
p.add_argument("--name", default="unpaired-candidates", help="the record's file name, without .md / .json")
p.add_argument("--out", required=True)
args = p.parse_args()
params = {}
for item in args.attack_param:
    name, kv = item.split(":", 1)
    key, value = kv.split("=", 1)
    params.setdefault(name, {})[key] = json.loads(value)
ds = data.load(args.data, args.data_path, seed=0)
rows, t0 = [], time.perf_counter()
for name in args.attack:
    c = suite.case(args.data, args.data_path, ds, name, params.get(name))
    cfg, model, held = c.cfg, c.model, c.held
    config = harness.fit_config(cfg, model, model.REPAIRABLE, harness.UNPAIRED_MODES)
    if args.clamp_tau_quantile:
        config = dataclasses.replace(config, tau_quantile=tuple(args.clamp_tau_quantile))
    fit = fr.fit(model, held.clean, flagged=held.flagged, config=config)
    chosen = fit.choice
    # the estimators as fit's full-sample ones: the matched clean images and every flagged image
    ref, _ = fr.matched_clean(model, held.clean, held.flagged)
    ests = {e.form: e for e in fr.estimators(model, fit.layers, config, held.clean[:2])}
    for e in ests.values():
        e.observe(ref, poisoned=False)
        e.observe(held.flagged, poisoned=True)
    ranked = sorted((e for e in fit.selection.evidence if "error" not in e), key=lambda e: -e["agreement"])
    for e in ranked[:args.top]:
        q = {} if e["tau_quantile"] is None else {"tau_quantile": e["tau_quantile"]}
        prof = ests[e["form"]].profile(mode=e["mode"], alpha=e["alpha"], layers=e["layers"], with_fingerprint=False,
                                       **q)
        is_chosen = all(e[k] == chosen[k] for k in ("layers", "form", "mode", "tau_quantile", "alpha"))
        rows.append({"attack": name, "layers": e["layers"], "form": e["form"], "mode": e["mode"],
                     "tau_quantile": e["tau_quantile"], "alpha": e["alpha"], "agreement": e["agreement"],
                     "margin_gap_alpha": e.get("margin_gap_alpha"), "chosen": is_chosen, **suite.rates(c, prof)})
        print(json.dumps(rows[-1]), flush=True)

wall = round(time.perf_counter() - t0, 1)
with open(f"{args.out}/{args.name}.json", "w") as f:
    json.dump({"data": args.data, "clamp_tau_quantile": args.clamp_tau_quantile, "rows": rows, "wall_s": wall}, f,
              indent=1)
with open(f"{args.out}/{args.name}.md", "w") as f:
    f.write("| attack | candidate | agreement | margin gap + alpha term | CA % | PA % | ASR % |\n"
            "|---|---|---:|---:|---:|---:|---:|\n")
    for r in rows:
        what = (f"{'+'.join(r['layers'])}, {r['form']}, {r['mode']}, q {r['tau_quantile']}, alpha {r['alpha']:g}"
                + (" **(chosen)**" if r["chosen"] else ""))
        f.write(f"| {r['attack']} | {what} | {r['agreement']:.3f} | {r['margin_gap_alpha']:.3f} | "
                f"{100 * r['ca']:.1f} | {100 * r['pa']:.1f} | {100 * r['asr']:.1f} |\n")
    f.write(f"\nThe {args.top} candidates of unpaired selection with the highest agreement (64 flagged images; "
            "agreements within 2 flagged images of the best are ties, ordered by the margin gap + alpha term, "
            "smaller first), each measured on the evaluation half"
            + (f"; clamp's tau at the clean {max(args.clamp_tau_quantile):g} quantile"
               if args.clamp_tau_quantile else "")
            + f". Wall {wall:.0f} s.\n")
print(f"wrote {args.out}/{args.name}.md ({wall:.0f} s)")
