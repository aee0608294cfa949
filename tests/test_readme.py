"""The README's quickstart, executed as written (so it cannot rot), and the README kept a user's page."""
import re
from pathlib import Path

import pytest

import fire_repair as fr

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(backdoored, tmp_path, monkeypatch):
    b = backdoored
    monkeypatch.chdir(tmp_path)
    names = {"model": b["model"], "clean": b["hold_clean"][:256], "x": b["hold_pairs"][0][:16],
             "x_triggered": b["hold_pairs"][1][:16]}
    exec(compile(_quickstart(), "README.md", "exec"), names)  # noqa: S102 (our own README)
    model = names["model"]  # the README wraps it with fr.with_input_layer
    assert model.model is b["model"] and not fr.repair_modules(model)  # detached at the end, as it says
    assert (tmp_path / "model.fire.safetensors").is_file() and (tmp_path / "model.pt2").is_file()
    assert names["scores"][list(names["scores"])[0]].shape == (8,)
    with fr.attached(model, fr.Profile.load("model.fire.safetensors", model)):
        pa = (fr.predict(model, b["eval_poison"]) == b["eval_poison_y"]).float().mean().item()
    assert pa > 0.9


def test_the_readme_is_a_users_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert text.startswith("# fire-kernels\n\n```bash\nmake demo") and "make test" in text.split("```")[1]
    assert "../shared" not in text and "/tmp/" not in text
