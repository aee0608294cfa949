"""`fire_eval.report`: several runs merged into one table, JSON and plot; updates laid over a base run."""
import json

import pytest

from fire_eval import cli, report


def test_report_merges_runs_into_one_table_json_and_plot(tmp_path, capsys):
    def run(attack, pa):
        rows = [{"defense": d, "CA": 0.8, "ASR": 1 - p, "PA": p, "reject_clean": 0.0, "reject_poison": 0.0}
                for d, p in (("none", 0.02), ("fire-clamp", pa))]
        rows[1].update(layers=["block2"], alpha=1.0, mode="clamp", tau_quantile=0.9 if attack == "sig" else None)
        return {"config": {"attack": attack}, "rows": rows}

    for i, (attack, pa) in enumerate((("badnets", 0.78), ("sig", 0.61))):
        (tmp_path / f"{i}.json").write_text(json.dumps({"runs": [run(attack, pa)]}))
    cli.main(["report", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "| badnets | fire-clamp | 80.0 | 22.0 | 78.0 |  | block2, clamp, alpha 1 |" in printed
    assert "| sig | fire-clamp | 80.0 | 39.0 | 61.0 |  | block2, clamp (tau q 0.9), alpha 1 |" in printed
    merged = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["config"]["attack"] for r in merged] == ["badnets", "sig"]
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_report_plot_has_an_online_panel_only_where_a_run_measured_online(tmp_path):
    rows = [{"defense": d, "CA": 0.8, "ASR": 0.1, "PA": 0.7} for d in ("none", "fire")]
    run = {"config": {"attack": "badnets"}, "rows": rows}
    widths = []
    for name, runs in (("offline", [run]), ("online", [{**run, "online": {"curve": [[0, 0.1], [8, 0.7]]}}])):
        report.plot(runs, tmp_path / f"{name}.png")
        png = (tmp_path / f"{name}.png").read_bytes()
        widths.append(int.from_bytes(png[16:20], "big"))  # the IHDR chunk's width in pixels
    assert widths[0] < 0.75 * widths[1]  # two panels against three


def test_report_update_lays_a_rerun_over_the_same_experiment(tmp_path, capsys):
    def run(rows, **extra):
        full = [{"defense": d, "CA": 0.8, "ASR": 1 - p, "PA": p, "reject_clean": 0.0, "reject_poison": 0.0}
                for d, p in rows]
        fire = [r for r in full if r["defense"].startswith("fire")]
        for r in fire:
            r.update(layers=["block2"], alpha=1.0)
        return {"config": {"attack": "badnets", "rate": 0.1, "seed": 0}, "attack_params": {}, "rows": full,
                "fire": {r["defense"]: {"evidence": []} for r in fire}, **extra}

    base = run([("none", 0.02), ("fire-clamp", 0.7), ("jpeg", 0.1)], auroc=0.9)
    update = run([("none", 0.02), ("fire", 0.75), ("fire-clamp", 0.72)], auroc=0.95)
    (tmp_path / "base.json").write_text(json.dumps({"runs": [base]}))
    (tmp_path / "new.json").write_text(json.dumps({"runs": [update]}))
    cli.main(["report", str(tmp_path / "base.json"), "--update", str(tmp_path / "new.json"), "--out",
              str(tmp_path / "out")])
    merged = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert [(r["defense"], r["PA"]) for r in merged["rows"]] == [  # in the update's order
        ("none", 0.02), ("fire", 0.75), ("fire-clamp", 0.72), ("jpeg", 0.1)]
    assert merged["auroc"] == 0.95 and set(merged["fire"]) == {"fire-clamp", "fire"}
    assert merged["updates"] == [["fire", "fire-clamp", "none"]]
    cli.main(["report", str(tmp_path / "base.json"), "--update", str(tmp_path / "new.json"), "--drop", "jpeg",
              "fire-clamp", "--out", str(tmp_path / "dropped")])
    dropped = json.loads((tmp_path / "dropped" / "results.json").read_text())["runs"][0]
    assert [r["defense"] for r in dropped["rows"]] == ["none", "fire"] and set(dropped["fire"]) == {"fire"}
    later = run([("none", 0.02), ("fire", 0.8), ("fire-gated", 0.77)], auroc=0.97)  # laid over the first update
    (tmp_path / "later.json").write_text(json.dumps({"runs": [later]}))
    cli.main(["report", str(tmp_path / "base.json"), "--update", str(tmp_path / "new.json"),
              str(tmp_path / "later.json"), "--out", str(tmp_path / "twice")])
    twice = json.loads((tmp_path / "twice" / "results.json").read_text())["runs"][0]
    assert [(r["defense"], r["PA"]) for r in twice["rows"]] == [
        ("none", 0.02), ("fire", 0.8), ("fire-gated", 0.77), ("fire-clamp", 0.72), ("jpeg", 0.1)]
    assert twice["auroc"] == 0.97 and len(twice["updates"]) == 2
    assert set(twice["fire"]) == {"fire-clamp", "fire", "fire-gated"}
    # the draws of the pairs follow their headline's row: an update brings its own, or makes the
    # base's stale where it refits that defense without them; a dropped defense takes them along
    def draws(pa):
        return {"defense": "fire-clamp", "n_pairs": 16, "draws": [{"draw": 0, "CA": 0.8, "ASR": 1 - pa, "PA": pa}]}

    def merge(b, u, drop=()):
        return report.update_runs([b], [u], drop)[0]

    with_draws = {**base, "pair_draws": draws(0.7)}
    assert merge(with_draws, run([("none", 0.02), ("fire", 0.75)]))["pair_draws"] == draws(0.7)
    assert "pair_draws" not in merge(with_draws, update)  # fire-clamp refitted, no draws
    assert merge(with_draws, {**update, "pair_draws": draws(0.72)})["pair_draws"] == draws(0.72)
    assert "pair_draws" not in merge(with_draws, run([("none", 0.02), ("fire", 0.75)]), drop=["fire-clamp"])
    # an update of another defense than the headline leaves the headline's AUROC
    assert merge(update, run([("none", 0.02), ("fire-clamp-unpaired", 0.6)], auroc=0.5))["auroc"] == 0.95
    other_model = run([("none", 0.5), ("fire", 0.75)])  # another undefended model: never mixed
    (tmp_path / "bad.json").write_text(json.dumps({"runs": [other_model]}))
    with pytest.raises(ValueError, match="not the same experiment"):
        cli.main(["report", str(tmp_path / "base.json"), "--update", str(tmp_path / "bad.json"), "--out",
                  str(tmp_path / "out2")])
    unmatched = run([("none", 0.02)])
    unmatched["config"]["attack"] = "sig"
    (tmp_path / "none.json").write_text(json.dumps({"runs": [unmatched]}))
    with pytest.raises(ValueError, match="no base run matches"):
        cli.main(["report", str(tmp_path / "base.json"), "--update", str(tmp_path / "none.json"), "--out",
                  str(tmp_path / "out3")])
