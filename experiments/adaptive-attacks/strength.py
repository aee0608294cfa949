"""Is paired FIRE's residual ASR a matter of strength or of what 16 pairs can resolve? (issue 36)

For each attack, on the evaluation suite's backdoored model, FIRE is fitted as the harness's
`fire` row fits it (fr.fit, the harness's candidates, the defender's 16 pairs). Then:

1. Strength: the chosen candidate (its layers, form, mode) rebuilt from the same clean images and
   pairs at every alpha of --alphas and at tau quantiles 0.9 / 0.99 / 0.999 (those of its mode),
   each measured on the evaluation half: CA, PA, ASR. If a stronger repair reached the
   never-poisoned model's ASR at the chosen repair's PA, only the choice would be wrong.
2. More twins: fr.fit again with --synthetic-pairs more pairs made from the defender's clean
   images by a per-pixel affine model of the trigger fitted on the 16 pairs
   (x' = a + b * x per input element, least squares: exact for a patch, a blend and an additive
   signal). Used only where that model explains at least --min-explained of the trigger's
   displacement on the pairs it was not fitted on (two folds of 8); otherwise the row says so.
   If 16 pairs were too few to resolve the residual, selection with 16 + N twins would choose
   a repair that leaves less.

    OMP_NUM_THREADS=2 python experiments/adaptive-attacks/strength.py --data cifar10 --data-path DIR \
        --attack adap-blend low-amp multi adap-patch --out experiments/adaptive-attacks/cifar10
"""
import argparse
import dataclasses
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
p.add_argument("--alphas", type=float, nargs="+", default=[0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0])
p.add_argument("--synthetic-pairs", type=int, default=256)
p.add_argument("--min-explained", type=float, default=0.9)
p.add_argument("--out", required=True)
args = p.parse_args()
ds = data.load(args.data, args.data_path, seed=0)
QUANTILES = {"clamp": (0.9, 0.99), "gated": (0.999,), "invert": (0.99, 0.999), "project": (None,)}


def affine_trigger(x: torch.Tensor, x_trig: torch.Tensor):
    """(a, b), per input element, the least-squares fit of x_trig = a + b * x over the pairs
    (b = 1 where the clean inputs do not vary there)."""
    c, t = x.double().flatten(1), x_trig.double().flatten(1)
    mc, mt = c.mean(0), t.mean(0)
    var = ((c - mc) ** 2).mean(0)
    b = torch.where(var > 1e-10, ((c - mc) * (t - mt)).mean(0) / var.clamp_min(1e-10), torch.ones_like(var))
    return mt - b * mc, b


def explained(x: torch.Tensor, x_trig: torch.Tensor) -> float:
    """The worse of two folds: the share of the trigger's displacement (x_trig - x) that the
    affine model fitted on one half of the pairs predicts on the other."""
    h, shares = len(x) // 2, []
    for fit_on, test_on in ((slice(0, h), slice(h, None)), (slice(h, None), slice(0, h))):
        a, b = affine_trigger(x[fit_on], x_trig[fit_on])
        c, t = x[test_on].double().flatten(1), x_trig[test_on].double().flatten(1)
        shares.append(1 - float(((t - (a + b * c)) ** 2).sum() / ((t - c) ** 2).sum()))
    return min(shares)


sweep, refits, t0 = [], [], time.perf_counter()
for name in args.attack:
    c = suite.case(args.data, args.data_path, ds, name)
    cfg, attack, model, held = c.cfg, c.attack, c.model, c.held
    clean_model = harness.clean_model(cfg, ds, progress=True)
    floor = (fr.predict(clean_model, c.eval_poison[0]) == attack.target).double().mean().item()
    config = harness.fit_config(cfg, model, model.REPAIRABLE, harness.SELECTED_MODES)
    fit = fr.fit(model, held.clean, pairs=held.pairs, config=config)
    choice = fit.choice
    chosen = suite.rates(c, fit.profile)
    print(name, choice, chosen, f"floor {floor:.4f}", flush=True)

    # 1. the chosen candidate at other strengths (without the smoothing fit may add)
    est = fr.estimators(model, choice["layers"], dataclasses.replace(config, forms=[choice["form"]]),
                        held.clean[:2])[0]
    est.observe(held.clean, poisoned=False)
    est.observe_pairs(*held.pairs)
    for q in QUANTILES[choice["mode"]]:
        for alpha in args.alphas:
            try:
                prof = est.profile(mode=choice["mode"], alpha=alpha, with_fingerprint=False,
                                   **({} if q is None else {"tau_quantile": q}))
            except ValueError as err:  # e.g. invert's 1 + alpha * slope too small
                sweep.append({"attack": name, "tau_quantile": q, "alpha": alpha, "error": str(err)})
                continue
            sweep.append({"attack": name, "layers": choice["layers"], "form": choice["form"], "mode": choice["mode"],
                          "tau_quantile": q, "alpha": alpha, "floor": floor,
                          **suite.rates(c, prof)})
            print(json.dumps(sweep[-1]), flush=True)

    # 2. 16 pairs plus synthetic twins from the affine trigger model
    x, x_trig = held.pairs
    share = explained(x, x_trig)
    row = {"attack": name, "floor": floor, "chosen": choice, **chosen, "explained": share,
           "synthetic_pairs": args.synthetic_pairs}
    if share >= args.min_explained:
        a, b = affine_trigger(x, x_trig)
        target = int(fr.predict(model, x_trig).mode().values)  # inferred, as unpaired selection does
        pool = held.clean[fr.predict(model, held.clean) != target]
        pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:args.synthetic_pairs]]
        made = (a + b * pick.double().flatten(1)).reshape(pick.shape).to(pick.dtype)
        more = fr.fit(model, held.clean, pairs=(torch.cat([x, pick]), torch.cat([x_trig, made])), config=config)
        row.update(more_choice=more.choice, more=suite.rates(c, more.profile))
    refits.append(row)
    print(json.dumps(row, default=str), flush=True)

wall = round(time.perf_counter() - t0, 1)
with open(f"{args.out}/strength.json", "w") as f:
    json.dump({"data": args.data, "sweep": sweep, "refits": refits, "wall_s": wall}, f, indent=1, default=str)


def pct(v):
    return f"{100 * v:.2f}"


with open(f"{args.out}/strength.md", "w") as f:
    f.write("## The chosen repair at other strengths\n\n| attack | repair | tau q | alpha | CA % | PA % | ASR % | "
            "clean-model ASR % |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
    for r in sweep:
        if "error" in r:
            f.write(f"| {r['attack']} | | {r['tau_quantile']} | {r['alpha']:g} | not estimable | | | |\n")
            continue
        what = f"{'+'.join(r['layers'])}, {r['form']}, {r['mode']}"
        f.write(f"| {r['attack']} | {what} | {r['tau_quantile']} | {r['alpha']:g} | {pct(r['ca'])} | {pct(r['pa'])} "
                f"| {pct(r['asr'])} | {pct(r['floor'])} |\n")
    f.write(f"\n## Selection with {args.synthetic_pairs} more twins (affine trigger model)\n\n| attack | explained | "
            "16 pairs: choice, PA / ASR % | 16 + N twins: choice, PA / ASR % | clean-model ASR % |\n"
            "|---|---:|---|---|---:|\n")
    for r in refits:
        def what(c):
            return f"{'+'.join(c['layers'])}, {c['form']}, {c['mode']}, q {c['tau_quantile']}, alpha {c['alpha']:g}"
        more = (f"{what(r['more_choice'])}, {pct(r['more']['pa'])} / {pct(r['more']['asr'])}" if "more" in r
                else f"not made (explained {r['explained']:.2f} < {args.min_explained})")
        f.write(f"| {r['attack']} | {r['explained']:.3f} | {what(r['chosen'])}, {pct(r['pa'])} / {pct(r['asr'])} | "
                f"{more} | {pct(r['floor'])} |\n")
    f.write(f"\nexplained: the worse of two folds of the share of the trigger's displacement that a per-pixel affine "
            f"model fitted on 8 pairs predicts on the other 8. Wall {wall:.0f} s.\n")
print(f"wrote {args.out}/strength.md ({wall:.0f} s)")
