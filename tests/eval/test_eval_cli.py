"""The `fire-eval` command line: `eval` writes its table, results and plot; the names it offers."""
import json

import pytest

from fire_eval import attacks, cli, data, models


@pytest.mark.slow
def test_cli_eval_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(["eval", "--attack", "trojan", "--defenses", "none", "fire-clamp", "blur", "--epochs", "6",
              "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-ablations", "--quiet",
              "--agreement-slack", "0", "--paired-beta", "mean"])
    printed = capsys.readouterr().out
    assert "| trojan | fire-clamp |" in printed
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [r["defense"] for r in results[0]["rows"]] == ["none", "fire-clamp", "blur"]
    assert results[0]["config"]["agreement_slack"] == 0  # the options reach the run's config
    assert results[0]["config"]["paired_beta"] == "mean"  # not the default (control_variate)
    for row in results[0]["rows"]:  # every number of the table is in the JSON
        assert f"{100 * row['PA']:.1f}" in printed and f"{100 * row['CA']:.1f}" in printed
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_names_every_model_attack_and_data_set(capsys):
    """The command line's choices are the suite's models and data sets."""
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in [*models.MODELS, *data.DATASETS])
    assert set(cli.DEMO_ATTACKS) | set(cli.DEMO_VIT_ATTACKS) <= set(attacks.ATTACKS)
