"""The `fire-eval` command: `demo` (the README's main job), `eval` (any attack, model, data,
defense) and `report` (one table from several runs)."""
import argparse
import sys
import time
from pathlib import Path

from . import attacks as attacks_mod
from . import data as data_mod
from . import harness, report
from . import models as models_mod

DEMO_ATTACKS = ["badnets", "blended", "sig", "wanet", "trojan", "adaptive", "moving"]
DEMO_VIT_ATTACKS = ["badnets", "blended", "token"]  # the transformer rows (token: a trigger token at a random position)
QUICK_ATTACKS = ["badnets", "blended", "moving"]  # a patch, a global trigger, a patch that moves
QUICK_DEFENSES = ["none", "fire", "fire-unpaired", "jpeg", "blur"]
DEMO_PAIR_DRAWS = 5  # the headline's spread over draws of the defender's 16 pairs (about 1 minute an attack)


def _common(p):
    p.add_argument("--out", default="fire-demo-out", help="folder for results.json, the table and the plot")
    p.add_argument("--json", default=None, help="where to write the JSON results (default: OUT/results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 8; 30 for the transformers)")
    p.add_argument("--rate", type=float, default=0.1, help="poison rate")
    p.add_argument("--target", type=int, default=0, help="target class")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override an attack parameter, e.g. s=1.0 (WaNet's warp strength); repeatable")
    p.add_argument("--cache", default=".fire-cache", help="trained-model cache folder ('' to disable)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-online", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--agreement-slack", type=int, default=None, metavar="N",
                   help="paired selection: agreements with the twins within N samples of the best are ties "
                        "(default: the harness's)")
    p.add_argument("--pair-draws", type=int, default=1, metavar="N",
                   help="fit paired FIRE's headline again on N - 1 other draws of the defender's pairs and "
                        "report PA's spread (eval: 1, the rows' own pairs only; demo: 5)")
    p.add_argument("--paired-beta", default=None, choices=["mean", "control_variate"],
                   help="paired FIRE: beta as the pairs' mean difference or its control-variate "
                        "correction (the harness's default; see fire_repair.Estimator)")


def _run_all(args, jobs, data, data_path=None, defenses=None, width=None, overrides=None):
    """Runs each (model, attack) of `jobs` on one data set; writes the outputs of all of them."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "run.log", "w")

    def log(*parts):  # the console and OUT/run.log; progress bars only where stderr is a terminal
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    ds = data_mod.load(data, data_path, seed=args.seed, cache_dir=args.cache or None)
    log(f"data: {ds.name}, {len(ds.y_train)} train / {len(ds.y_test)} test images, {ds.num_classes} classes")
    results = []
    for model, attack in jobs:
        cfg = harness.RunConfig(attack=attack, model=model, data=data, data_path=data_path, rate=args.rate,
                                target=args.target, seed=args.seed, epochs=args.epochs, width=width,
                                cache_dir=args.cache or None, ablations=not args.no_ablations,
                                online=not args.no_online, attack_params=_attack_params(args.attack_param),
                                **(overrides or {}))
        if defenses:
            cfg.defenses = defenses
        if args.agreement_slack is not None:
            cfg.agreement_slack = args.agreement_slack
        if args.paired_beta is not None:
            cfg.paired_beta = args.paired_beta
        cfg.pair_draws = args.pair_draws
        log(f"{attack}: {model} on {ds.name}")
        results.append(harness.run(cfg, dataset=ds, progress=progress, log=log))
    json_path = _write_outputs(results, out, args.json, log)
    log(f"\nwrote {json_path}, {out / 'table.md'}, {out / 'results.png'}, {out / 'run.log'} in "
        f"{time.perf_counter() - t0:.0f} s")
    log_file.close()
    return results


def _attack_params(items) -> dict:
    """KEY=VALUE strings as a dict of numbers (or strings where a value is not a number)."""
    import json

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--attack-param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _write_outputs(results, out: Path, json_path=None, log=print) -> Path:
    """table.md (printed too), results.json and results.png of a list of runs."""
    text = report.table(results)
    if any("pair_draws" in r for r in results):
        text += "\n\nPaired FIRE over draws of the defender's pairs (draw 0: the rows above):\n\n"
        text += report.draws_table(results)
    if any(r.get("ablations") for r in results):
        text += "\n\nLayer chosen without labels against the best single layer in hindsight:\n\n"
        text += report.layer_table(results)
        text += "\n\nAblations around the selected repair (evaluation half):\n\n" + report.ablation_table(results)
    log("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    json_path = Path(json_path) if json_path else out / "results.json"
    report.write_json(results, json_path)
    report.plot(results, out / "results.png")
    return json_path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fire-eval",
                                     description="FIRE's evaluation suite: attacks, models, defenses, metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FIRE against the baselines on the embedded digits data: a quick table "
                                       "(three attacks on the small CNN), or every attack with --full")
    _common(demo)
    demo.add_argument("--full", action="store_true",
                      help="every attack on the CNN and the ViT, with ablations, the online curve and 5 draws of the "
                           "pairs (about 20 minutes on 2 cores)")
    demo.add_argument("--attacks", nargs="+", default=None, choices=sorted(attacks_mod.ATTACKS),
                      help="attacks on the small CNN")
    demo.add_argument("--vit-attacks", nargs="*", default=None, choices=sorted(attacks_mod.ATTACKS),
                      help="attacks on the small ViT")
    ev = sub.add_parser("eval", help="one attack / model / data set / defense list")
    _common(ev)
    ev.add_argument("--attack", nargs="+", default=["badnets"], choices=sorted(attacks_mod.ATTACKS))
    ev.add_argument("--model", default="cnn", choices=sorted(models_mod.MODELS))
    ev.add_argument("--width", type=int, default=None, help="model width (default: the model's standard width)")
    ev.add_argument("--data", default="digits", choices=sorted(data_mod.DATASETS))
    ev.add_argument("--data-path", default=None,
                    help="local folder of CIFAR-10 (batches or image folders), GTSRB, or any image folders "
                         "(train/<class>/*, test/<class>/*) with --data folder; never downloaded")
    ev.add_argument("--defenses", nargs="+", default=None)
    ev.add_argument("--n-pairs", type=int, default=16, help="paired FIRE: triggered images with twins")
    ev.add_argument("--n-poison-seen", type=int, default=64, help="unpaired FIRE: flagged images, no twins")
    ev.add_argument("--n-clean-holdout", type=int, default=None,
                    help="clean held-out images the defender uses (default: half the test set)")
    ev.add_argument("--n-eval", type=int, default=None, help="evaluation images (default: the other half)")
    rp = sub.add_parser("report", help="one table, JSON and plot from the results.json of several runs")
    rp.add_argument("inputs", nargs="+", help="results.json files written by demo or eval")
    rp.add_argument("--update", nargs="+", default=[],
                    help="results.json files whose rows replace (or add to) the same experiment's rows in INPUTS")
    rp.add_argument("--drop", nargs="+", default=[], help="defenses to leave out of the merged runs")
    rp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "report":
        import json

        def load(paths):
            return [run for path in paths for run in json.loads(Path(path).read_text())["runs"]]

        runs = report.update_runs(load(args.inputs), load(args.update), drop=args.drop)
        _write_outputs(runs, Path(args.out))
        return 0
    if args.command == "demo":
        if args.full:
            attacks, vit_attacks, defenses = DEMO_ATTACKS, DEMO_VIT_ATTACKS, None
            args.pair_draws = DEMO_PAIR_DRAWS if args.pair_draws == 1 else args.pair_draws
        else:  # the first table in a couple of minutes on a fresh 2-core machine
            attacks, vit_attacks, defenses = QUICK_ATTACKS, [], QUICK_DEFENSES
            args.no_ablations = args.no_online = True
        jobs = [("cnn", a) for a in (args.attacks or attacks)] + \
            [("vit", a) for a in (vit_attacks if args.vit_attacks is None else args.vit_attacks)]
        _run_all(args, jobs, "digits", defenses=defenses)
    else:
        overrides = {"n_pairs": args.n_pairs, "n_poison_seen": args.n_poison_seen,
                     "n_clean_holdout": args.n_clean_holdout, "n_eval": args.n_eval}
        _run_all(args, [(args.model, a) for a in args.attack], args.data, args.data_path, args.defenses, args.width,
                 overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
