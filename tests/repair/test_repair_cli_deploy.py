"""`fire-repair fit` and `fire-repair export` on a model given as a factory and a weights file,
and the exported package run in a process that never imports fire_repair."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fire_repair as fr
from fire_repair import cli


def _write_images(folder, x):
    folder.mkdir(parents=True)
    for i, img in enumerate(x):
        a = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(a)).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, backdoored):
    """What a user brings: a factory module, a safetensors file, folders of images."""
    root = tmp_path_factory.mktemp("user")
    (root / "mynet.py").write_text(textwrap.dedent("""
        from fire_eval import models

        def make():
            return models.build("cnn")
    """))
    save_file(backdoored["model"].state_dict(), str(root / "weights.safetensors"))
    _write_images(root / "clean", backdoored["hold_clean"][:256])
    _write_images(root / "twins", backdoored["hold_pairs"][0][:16])
    _write_images(root / "triggered", backdoored["hold_pairs"][1][:16])
    _write_images(root / "small", torch.rand(2, 3, 16, 16))
    return root


def _run(argv, monkeypatch, root):
    monkeypatch.chdir(root)
    return cli.main(argv)


def test_cli_fit_writes_the_profile_choice_and_evidence(user_files, monkeypatch, capsys):
    root = user_files
    rc = _run(["fit", "--model", "mynet:make", "--weights", "weights.safetensors", "--clean", "clean",
               "--pairs", "twins", "triggered", "--out", "out"], monkeypatch, root)
    assert rc == 0
    choice = json.loads((root / "out" / "choice.json").read_text())
    assert choice["mode"] in ("clamp", "gated", "invert") and choice["coverage"]["n_seen"] == 10
    assert " *" in (root / "out" / "evidence.md").read_text()
    # the model behind fr.with_input_layer: its pixels are the first layer offered
    assert choice["layers_offered"][0] == "input" and choice["layers_offered"][1].startswith("model.")
    model = cli.load_model("mynet:make", str(root / "weights.safetensors"))
    profile = fr.Profile.load(root / "out" / "profile.fire.safetensors", model)
    assert profile.layer_names == choice["layers"]


def test_cli_export_says_when_fit_made_another_input_layer_choice(user_files, monkeypatch, capsys, tmp_path):
    root = user_files
    if not (root / "out" / "profile.fire.safetensors").exists():
        assert _run(["fit", "--model", "mynet:make", "--weights", "weights.safetensors", "--clean", "clean",
                     "--pairs", "twins", "triggered", "--out", "out"], monkeypatch, root) == 0
    capsys.readouterr()
    rc = _run(["export", "--model", "mynet:make", "--weights", "weights.safetensors", "--no-input-layer",
               "--profile", "out/profile.fire.safetensors", "--example", "twins", "--out", str(tmp_path / "m.pt2")],
              monkeypatch, root)
    err = capsys.readouterr().err
    assert rc == 2 and "same --no-input-layer choice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "mynet", "--weights", "weights.safetensors"], "must be 'package.module:factory'"),
    (["--model", "nosuch:make", "--weights", "weights.safetensors"], "cannot import it"),
    (["--model", "mynet:make", "--weights", "missing.safetensors"], "no such file"),
    (["--model", "mynet:make", "--weights", "mynet.py"], "not a safetensors file"),
])
def test_cli_says_what_was_wrong_with_the_model(user_files, monkeypatch, capsys, argv, message):
    rc = _run(["fit", *argv, "--clean", "clean", "--flagged", "triggered", "--out", "out"], monkeypatch, user_files)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_says_what_was_wrong_with_the_images(user_files, monkeypatch, capsys):
    base = ["fit", "--model", "mynet:make", "--weights", "weights.safetensors", "--out", "out"]
    assert _run([*base, "--clean", "nowhere", "--flagged", "triggered"], monkeypatch, user_files) == 2
    assert "--clean 'nowhere': no such folder" in capsys.readouterr().err
    assert _run([*base, "--clean", "small", "--flagged", "triggered"], monkeypatch, user_files) == 2
    assert "the model does not take the images of --clean (shape (3, 16, 16))" in capsys.readouterr().err
    assert _run([*base, "--clean", "clean", "--flagged", "small"], monkeypatch, user_files) == 2
    assert "all images must have one size" in capsys.readouterr().err
    assert _run([*base, "--clean", "clean", "--pairs", "twins", "clean"], monkeypatch, user_files) == 2
    assert "same file names" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_package_runs_without_fire_repair(user_files, monkeypatch, backdoored, tmp_path):
    """fit, then export through the CLI; a fresh process loads the package with torch alone and
    matches eager at several batch sizes (the batch is dynamic)."""
    root = user_files
    if not (root / "out" / "profile.fire.safetensors").exists():
        assert _run(["fit", "--model", "mynet:make", "--weights", "weights.safetensors", "--clean", "clean",
                     "--pairs", "twins", "triggered", "--out", "out"], monkeypatch, root) == 0
    rc = _run(["export", "--model", "mynet:make", "--weights", "weights.safetensors", "--profile",
               "out/profile.fire.safetensors", "--example", "twins", "--out", str(tmp_path / "model.pt2")],
              monkeypatch, root)
    assert rc == 0
    model = cli.load_model("mynet:make", str(root / "weights.safetensors"))
    fr.attach(model, fr.Profile.load(root / "out" / "profile.fire.safetensors", model))
    x = backdoored["eval_poison"][:37]
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "ref.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'ref.safetensors')!r})
        package = torch._inductor.aoti_load_package({str(tmp_path / 'model.pt2')!r})
        for n in (1, 5, 37):
            assert torch.allclose(package(ref["x"][:n]), ref["y"][:n], atol=1e-4), n
        assert not any(name.startswith("fire_") for name in sys.modules), sorted(sys.modules)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_export_refuses_a_model_without_repairs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no repair is attached"):
        fr.export(model, torch.randn(2, 3), tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=r"\.pt2"):
        fr.export(model, torch.randn(2, 3), tmp_path / "m.zip")
