"""How results.json here was assembled from the session's runs (see the README's CIFAR-10
section): cifar-a (badnets, blended; every defence) with its fire-clamp-unpaired rows replaced
by cifar-d's (the same models, splits and seed, re-run after the unpaired selection criterion
changed), then the runs given on the command line (sig+wanet, trojan, adaptive).

    python merge.py runs/cifar-b/results.json runs/cifar-c/results.json runs/cifar-e/results.json
    fire-repair report runs/cifar-merged.json --out benchmarks/results/cifar10-jpeg-cnn32
"""
import json
import sys


def load(path):
    with open(path) as f:
        return json.load(f)["runs"]


a = load("runs/cifar-a/results.json")
d = {r["config"]["attack"]: r for r in load("runs/cifar-d/results.json")}
for run in a:
    new = d[run["config"]["attack"]]
    row = next(r for r in new["rows"] if r["defense"] == "fire-clamp-unpaired")
    run["rows"] = [row if r["defense"] == "fire-clamp-unpaired" else r for r in run["rows"]]
    run["fire"]["fire-clamp-unpaired"] = new["fire"]["fire-clamp-unpaired"]
    run["note"] = "fire-clamp-unpaired row re-run with the revised unpaired criterion (runs/cifar-d)"
runs = a + [r for p in sys.argv[1:] for r in load(p)]
with open("runs/cifar-merged.json", "w") as f:
    json.dump({"runs": runs}, f, indent=1, default=float)
print(len(runs), "runs")
