"""Tables of draws.py's results: per rule and case, the mean PA over the draws (and the
harness's own draw 0), the worst draw, and on how many draws PA >= 0.95 x CA. Run from the
repository root:

    python experiments/selection-draws/summarize.py [CASE.json ...] > summary.md
"""
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main():
    paths = [Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("*.json"))
    cases = [json.loads(p.read_text()) for p in paths]
    rules = list(cases[0]["draws"][0]["rules"])
    names = [f"{c['model']} {c['attack']}" + (" cv" if c["paired_beta"] == "control_variate" else "") for c in cases]
    print("Mean PA (%) over the draws; in brackets the worst draw\n")
    print("| rule | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for rule in rules:
        cells, means = [], []
        for c in cases:
            pa = [100 * d["rules"][rule]["PA"] for d in c["draws"]]
            means.append(statistics.mean(pa))
            cells.append(f"{means[-1]:.1f} ({min(pa):.1f})")
        print(f"| {rule} | " + " | ".join(cells) + f" | {statistics.mean(means):.2f} |")
    print("\nDraws with PA >= 0.95 x CA (CA of the chosen repair), of " +
          ", ".join(f"{n}: {len(c['draws'])}" for n, c in zip(names, cases, strict=True)) + "\n")
    print("| rule | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for rule in rules:
        hits = [sum(d["rules"][rule]["PA"] >= 0.95 * d["rules"][rule]["CA"] for d in c["draws"]) for c in cases]
        print(f"| {rule} | " + " | ".join(map(str, hits)) + " |")
    print("\nMean CA (%) of the chosen repairs\n")
    print("| rule | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for rule in rules:
        ca = [statistics.mean(100 * d["rules"][rule]["CA"] for d in c["draws"]) for c in cases]
        print(f"| {rule} | " + " | ".join(f"{v:.1f}" for v in ca) + " |")
    print("\nDraw 0 (the harness's pairs and fold seed): PA (%)\n")
    print("| rule | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for rule in rules:
        print(f"| {rule} | " + " | ".join(f"{100 * c['draws'][0]['rules'][rule]['PA']:.1f}" for c in cases) + " |")


if __name__ == "__main__":
    main()
