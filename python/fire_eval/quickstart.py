"""FIRE end to end with the public API: train a BadNets-backdoored CNN on the embedded digits,
estimate the trigger direction, save and reload the profile, attach it, and compare.

    python -m fire_eval.quickstart [--out DIR]
"""
import argparse
import tempfile
from pathlib import Path

import fire_repair as fr
from fire_eval.metrics import predict, rates
from fire_eval.scenario import backdoored_digits


def run(out_dir, seed: int = 0, progress: bool = True) -> dict:
    b = backdoored_digits("badnets", seed=seed, progress=progress)
    model, attack = b["model"], b["attack"]
    # the defender's held-out half (clean samples and triggered twins); the other half is for scoring
    score = lambda m: rates(predict(m, b["eval_clean"]), b["eval_y"], predict(m, b["eval_poison"]),  # noqa: E731
                            b["eval_poison_y"], attack.target)
    before = score(model)

    est = fr.Estimator(model, layers=["block2"], k=1)
    est.observe(b["hold_clean"], poisoned=False)
    est.observe_pairs(*b["hold_pairs"])
    profile = est.profile(mode="clamp", alpha=1.0, tau_quantile=0.99)
    path = Path(out_dir) / "digits-badnets.fire.safetensors"
    profile.save(path)

    loaded = fr.Profile.load(path, model)  # refuses a file that does not belong to this model
    fr.attach(model, loaded)
    after = score(model)
    fr.detach(model)
    return {"before": before, "after": after, "profile": str(path)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the profile (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.out or tmp, seed=args.seed)
    for when in ("before", "after"):
        r = res[when]
        print(f"{when:>6}: CA {100 * r['CA']:.1f}%  ASR {100 * r['ASR']:.1f}%  PA {100 * r['PA']:.1f}%")
    return res


if __name__ == "__main__":
    main()
