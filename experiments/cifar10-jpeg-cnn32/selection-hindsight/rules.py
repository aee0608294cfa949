"""Selection rules replayed on the candidates hindsight.py scored: which candidate each rule
picks under the expected-drop limit of 1 %, and its PA in hindsight (paired: 16 twins, KL
tie-break; unpaired: 64 flagged, margin tie-break, and the margin gap: the distance of the
repaired samples' mean margin from the model's mean margin on clean images). Run from anywhere:

    python rules.py adaptive badnets blended sig wanet trojan moving
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(os.environ.get("HINDSIGHT_DIR", Path(__file__).parent))  # where the JSON files are

N = 16  # pairs
CLEAN_MARGIN = json.loads(HERE.joinpath("clean-margin.json").read_text())  # clean_margin.py


def fmt(e):
    return (f"{'+'.join(e['layers'])} {e['form']} {e['mode']} q{e['tau_quantile']} a{e['alpha']}: "
            f"PA {100 * e['pa']:.1f} CA {100 * e['ca']:.1f} (agreement {round(e['agreement'] * N)}/{N}, "
            f"KL {e['twin_kl']:.3f}, expected drop {100 * e['expected_drop_all']:.2f} %)")


def within(ok, slack, n=N, tie=lambda e: e["twin_kl"]):
    top = max(round(e["agreement"] * n) for e in ok)
    return min([e for e in ok if round(e["agreement"] * n) >= top - slack], key=tie)


def brief(e):
    return f"{100 * e['pa']:.1f} ({'+'.join(e['layers'])} {e['form']} a{e['alpha']})"


for attack in sys.argv[1:]:
    print(f"== {attack}")
    paired = HERE.joinpath(f"{attack}.json")
    if paired.exists():  # a folder may hold the unpaired candidates only
        d = json.loads(paired.read_text())
        ok = [e for e in d["candidates"] if e["expected_drop_all"] <= 0.01]
        print(f"   best in hindsight      {fmt(max(d['candidates'], key=lambda e: e['pa']))}")
        print(f"   exact agreement, KL    {fmt(within(ok, 0))}")
        print(f"   within 1 twin, KL      {fmt(within(ok, 1))}")
    unpaired = HERE.joinpath(f"{attack}-unpaired.json")
    if unpaired.exists():
        c = json.loads(unpaired.read_text())["candidates"]
        ok = [e for e in c if e["expected_drop_all"] <= 0.01]
        picks = [brief(within(ok, s, 64, lambda e: (-e["margin"], e["expected_drop_all"]))) for s in (0, 1, 2)]
        print(f"   unpaired: best {brief(max(c, key=lambda e: e['pa']))}; slack 0: {picks[0]}; 1: {picks[1]}; "
              f"2: {picks[2]}")
        m = CLEAN_MARGIN[attack]["mean"]  # the margin-gap tie-break (select_unpaired's default, slack 2)
        gap = [brief(within(ok, s, 64, lambda e, m=m: (abs(e["margin"] - m), e["expected_drop_all"])))
               for s in (1, 2, 4)]
        print(f"   unpaired, margin gap to the clean mean margin {m:.2f}: slack 1: {gap[0]}; 2: {gap[1]}; "
              f"4: {gap[2]}")
        # select_unpaired's default since 2026-11-24: the gap plus half the alpha (the gentler repair among ties)
        gentle = [brief(within(ok, s, 64, lambda e, m=m: (abs(e["margin"] - m) + 0.5 * e["alpha"],
                                                          e["expected_drop_all"]))) for s in (1, 2, 4)]
        print(f"   unpaired, margin gap + 0.5 x alpha: slack 1: {gentle[0]}; 2: {gentle[1]}; 4: {gentle[2]}")
