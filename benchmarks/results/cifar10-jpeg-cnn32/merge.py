"""How results.json here was assembled from one session's runs (kept for provenance).

    python merge.py OUT.json RUN.json ... --unpaired UNP.json ...

Every run of the RUN files (one per attack, every defence) is kept, except that its
`fire-clamp-unpaired` row and evidence are replaced by those of the UNP file run for the same
attack and attack parameters: the same cached model, split and seed, re-run with only that
defence after the selection code changed during the session (the note of each replaced run
says so)."""
import json
import sys


def key(run):
    return run["config"]["attack"], json.dumps(run["attack_params"], sort_keys=True), run["config"]["rate"]


def main(argv):
    out, rest = argv[0], argv[1:]
    split = rest.index("--unpaired") if "--unpaired" in rest else len(rest)
    runs = [r for p in rest[:split] for r in json.load(open(p))["runs"]]
    unpaired = {key(r): r for p in rest[split + 1:] for r in json.load(open(p))["runs"]}
    for run in runs:
        new = unpaired.get(key(run))
        if new is None:
            continue
        row = next(r for r in new["rows"] if r["defense"] == "fire-clamp-unpaired")
        run["rows"] = [row if r["defense"] == "fire-clamp-unpaired" else r for r in run["rows"]]
        run["fire"]["fire-clamp-unpaired"] = new["fire"]["fire-clamp-unpaired"]
        run["note"] = ("fire-clamp-unpaired re-run after the selection change of this session (same model, split, "
                       "seed)")
    order = ["badnets", "blended", "sig", "wanet", "trojan", "adaptive", "moving"]  # the README's order
    runs.sort(key=lambda r: order.index(r["config"]["attack"]) if r["config"]["attack"] in order else len(order))
    json.dump({"runs": runs}, open(out, "w"), indent=1, default=float)
    print(f"{len(runs)} runs, {sum('note' in r for r in runs)} with the unpaired row replaced -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
