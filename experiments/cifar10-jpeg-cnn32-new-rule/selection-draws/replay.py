"""Paired tie-breaks replayed over draws of the defender's pairs (not part of the library).

Reads the cifar-ATTACK-cv.json files that `../../selection-draws/draws.py ... --candidates 2`
wrote here (every candidate within 2 twins of the best agreement that keeps the clean limit,
with its PA and CA on the evaluation half) and, for each rule, picks one candidate per draw.
Prints, per attack and rule, PA's mean and worst over the draws, the mean CA, and how many draws
reach the attack's target against the undefended CA of `../results.json`. Run from anywhere:

    python replay.py adaptive badnets moving trojan adaptive-32pairs

(`ATTACK-32pairs`: the run with `--pairs 32`, cifar-ATTACK-cv-32pairs.json.)
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["input", "block1", "block2", "block3", "fc"]  # the small CNN's repairable layers
TARGET = {"badnets": 0.97, "trojan": 0.97, "adaptive": 0.97, "moving": 0.95}  # x CA, global: 0.90


def depth(c):
    return sum(ORDER.index(name) for name in c["choice"][0]) / len(c["choice"][0])


# rule -> (slack in twins, key to minimise among the candidates within the slack of the best)
RULES = {
    "twin_kl, slack 1 (the harness)": (1, lambda c: c["twin_kl"]),
    "twin_kl, slack 0": (0, lambda c: c["twin_kl"]),
    "twin_kl, slack 2": (2, lambda c: c["twin_kl"]),
    "expected drop, slack 1": (1, lambda c: (c["expected_drop"], c["twin_kl"])),
    "clean change, slack 1": (1, lambda c: (c["clean_change"], c["twin_kl"])),
    "twin_kl + clean change, slack 1": (1, lambda c: c["twin_kl"] + c["clean_change"]),
    "shallowest layers, slack 1": (1, lambda c: (depth(c), c["twin_kl"])),
    "shallowest layers, slack 2": (2, lambda c: (depth(c), c["twin_kl"])),
    "smallest alpha, slack 1": (1, lambda c: (c["choice"][4], c["twin_kl"])),
    "best in hindsight (labels; slack 2)": (2, lambda c: -c["PA"]),  # the ceiling, not a rule
}


def pick(candidates, n, slack, tie):
    top = max(round(c["agreement"] * n) for c in candidates)
    # exact ties (a layer whose repair changes nothing) go to the smaller clean change, as in fr.select
    return min((c for c in candidates if round(c["agreement"] * n) >= top - slack),
               key=lambda c: (tie(c), c["clean_change"]))


def undefended_ca(attack):
    runs = json.loads((HERE.parent / "results.json").read_text())["runs"]
    run = next(r for r in runs if r["config"]["attack"] == attack)
    return next(row["CA"] for row in run["rows"] if row["defense"] == "none")


def main(attacks):
    print("| attack | rule | PA mean % | PA worst % | CA mean % | draws at target |")
    print("|---|---|---:|---:|---:|---:|")
    for name_arg in attacks:
        attack, _, pairs = name_arg.partition("-")  # "adaptive" or "adaptive-32pairs"
        d = json.loads((HERE / f"cifar-{attack}-cv{'-' + pairs if pairs else ''}.json").read_text())
        ca0, target = undefended_ca(attack), TARGET.get(attack, 0.90)
        for name, (slack, tie) in RULES.items():
            chosen = [pick(draw["candidates"], d["n_pairs"], slack, tie) for draw in d["draws"]]
            if name.endswith("(the harness)"):  # the replay must reproduce the study's own choice
                for draw, c in zip(d["draws"], chosen, strict=True):
                    harness_choice = draw["rules"]["fine grid, twin_kl, slack 1"]["choice"]
                    assert c["choice"] == harness_choice, (name_arg, draw["draw"])
            pa = [c["PA"] for c in chosen]
            meets = sum(p >= target * ca0 for p in pa)
            print(f"| {name_arg} | {name} | {100 * sum(pa) / len(pa):.1f} | {100 * min(pa):.1f} | "
                  f"{100 * sum(c['CA'] for c in chosen) / len(chosen):.1f} | {meets} / {len(pa)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
