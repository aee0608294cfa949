"""Data loaders (offline, safe), the harness end to end, and the command line."""
import json
import pickle

import numpy as np
import pytest
import torch
from fire_eval import attacks, cli, data, harness, models, report


def test_digits_is_embedded_and_seeded():
    a, b = data.digits(seed=0), data.digits(seed=0)
    assert a.x_train.shape[1:] == (3, 32, 32) and a.num_classes == 10
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert torch.equal(a.y_test, b.y_test)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="Final_Training"):
        data.gtsrb(tmp_path)
    with pytest.raises(ValueError, match="data-path"):
        data.load("cifar10", None)


def _fake_cifar_bin(root, n=5):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        rec.tofile(root / name)


def test_cifar10_binary_batches(tmp_path):
    _fake_cifar_bin(tmp_path / "cifar-10-batches-bin")
    ds = data.cifar10(tmp_path)
    assert ds.x_train.shape == (25, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert ds.y_train.max() < 10


def test_cifar10_python_batches_and_refusal_of_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, f)
    ds = data.cifar10(tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_test.tolist() == [1, 2]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.cifar10(tmp_path)


def test_gtsrb_official_layout(tmp_path):
    from PIL import Image

    train = tmp_path / "GTSRB" / "Final_Training" / "Images"
    test = tmp_path / "GTSRB" / "Final_Test" / "Images"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"
    for c in (0, 1):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        Image.new("RGB", (40, 40), (255 * c, 0, 0)).save(d / "00000_00000.ppm")
        (d / f"GT-{c:05d}.csv").write_text(f"{header};ClassId\n00000_00000.ppm;40;40;5;5;35;35;{c}\n")
    test.mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(test / "00000.ppm")
    (test / "GT-final_test.csv").write_text(f"{header};ClassId\n00000.ppm;40;40;5;5;35;35;1\n")
    ds = data.gtsrb(tmp_path)
    assert ds.x_train.shape == (2, 3, 32, 32) and ds.y_train.tolist() == [0, 1] and ds.num_classes == 43
    assert ds.x_train[1, 0].mean() > 0.99 and ds.x_test[0, 1].mean() > 0.99


def test_split_is_random_and_disjoint_on_a_class_ordered_test_set():
    """Image folders list the test set class by class: the defender's half and the evaluation half
    must each hold every class, and share no image."""
    n, classes = 400, 10
    y = torch.arange(classes).repeat_interleave(n // classes)  # class-ordered, as folders load
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 8).contiguous() / n
    ds = data.Dataset("ordered", x[:0], y[:0], x, y, classes)
    cfg = harness.RunConfig(n_pairs=16, n_poison_seen=64)
    held, (ec, ey), (ep, epy), stream = harness.split(cfg, ds, attacks.build("blended"))
    ids = lambda t: set((t[:, 0, 0, 0] * n).round().long().tolist())  # noqa: E731
    assert set(ey.tolist()) == set(range(classes)) and set(epy.tolist()) == set(range(1, classes))
    assert len(ids(held.clean)) == len(held.clean) == n // 2 and len(ids(ec)) == n // 2
    assert ids(held.clean).isdisjoint(ids(ec)) and ids(held.pairs[0]) <= ids(held.clean)
    assert len(set(y[sorted(ids(held.pairs[0]))].tolist())) > 3  # pairs from many classes, not the first
    assert len(held.pairs[0]) == 16 and len(held.flagged) == 64 and torch.equal(stream[:64], held.flagged)
    assert len(ep) == len(epy) == int((ey != 0).sum())
    # the pool of pairs the harness draws from: its first n_pairs are the pairs; other draws are
    # other rows of it, twin and triggered image still together
    twins, triggered = held.pool
    assert torch.equal(twins[:16], held.pairs[0]) and torch.equal(triggered[:16], held.pairs[1])
    assert held.drawn(0, 16) is held
    other = held.drawn(1, 16)
    assert torch.equal(other.drawn(0, 16).pairs[0], other.pairs[0]) and other.flagged is held.flagged
    where = [next(i for i in range(len(twins)) if torch.equal(twins[i], t)) for t in other.pairs[0]]
    assert len(set(where)) == 16 and set(where) != set(range(16))
    assert all(torch.equal(triggered[i], p) for i, p in zip(where, other.pairs[1], strict=True))
    assert torch.equal(held.drawn(1, 16).pairs[1], other.pairs[1])  # seeded by the draw


@pytest.mark.slow
def test_harness_small_run(tmp_path):
    cfg = harness.RunConfig(attack="badnets", epochs=6, cache_dir=str(tmp_path / "cache"),
                            defenses=["none", "clean-model", "fire-clamp", "fire", "fire-gated", "fire-clamp-unpaired",
                                      "shrinkpad", "strip"], alphas=[1.0], unpaired_alphas=[1.0, 2.0], ablations=False)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    rows = {r["defense"]: r for r in res["rows"]}
    assert rows["none"]["ASR"] > 0.9
    # the reference: the same recipe trained without poison, cached beside the backdoored model
    assert rows["clean-model"]["ASR"] < 0.05 and rows["clean-model"]["PA"] > 0.9
    assert abs(rows["clean-model"]["CA"] - rows["none"]["CA"]) < 0.05
    assert len(list((tmp_path / "cache").glob("clean-*.safetensors"))) == 1
    # a reference row, marked so in the JSON (the plot hatches it); no defence row is
    assert rows["clean-model"]["reference"] is True
    assert not any(r.get("reference") for name, r in rows.items() if name != "clean-model")
    assert rows["fire-clamp"]["PA"] > 0.9 and rows["fire-clamp"]["CA"] >= rows["none"]["CA"] - 0.01
    assert rows["fire-gated"]["mode"] == "gated" and rows["fire-gated"]["PA"] > 0.9
    assert rows["fire"]["mode"] in ("clamp", "gated", "invert") and rows["fire"]["PA"] > 0.9
    chosen = res["fire"]["fire"]
    # the mode chosen by the same criterion
    assert {e["mode"] for e in chosen["evidence"]} == set(harness.SELECTED_MODES) == {"clamp", "gated", "invert"}
    # paired: clamp's tau among the candidate quantiles; unpaired: the most conservative only
    assert {e["tau_quantile"] for e in chosen["evidence"] if e["mode"] == "clamp"} == {0.9, 0.99}
    assert {e["tau_quantile"] for e in res["fire"]["fire-clamp-unpaired"]["evidence"]} == {0.99}
    # each selection tries its own alphas
    assert {e["alpha"] for e in chosen["evidence"]} == {1.0}
    assert {e["alpha"] for e in res["fire"]["fire-clamp-unpaired"]["evidence"]} == {1.0, 2.0}
    assert rows["fire"]["tau_quantile"] == chosen["tau_quantile"]
    assert rows["strip"]["reject_poison"] > 0.5
    assert res["auroc"] > 0.95
    curve = res["online"]["curve"]
    assert curve[0][0] == 0 and curve[-1][1] > curve[0][1]
    # online updates are unpaired: the curve follows the unpaired selection's choice
    assert res["online"]["follows"] == "fire-clamp-unpaired"
    assert res["online"]["layers"] == rows["fire-clamp-unpaired"]["layers"]
    assert res["online"]["alpha"] == rows["fire-clamp-unpaired"]["alpha"]
    assert f"| fire-clamp-unpaired: {'+'.join(res['online']['layers'])}" in report.table([res])
    again = harness.run(cfg, progress=False, log=lambda *a: None)
    assert again["model_cached"] and again["rows"][2]["PA"] == rows["fire-clamp"]["PA"]  # seeded, cached


@pytest.mark.slow
def test_pair_draws_refit_the_headline_on_other_pairs(tmp_path, capsys):
    """--pair-draws N: the paired headline fitted on N - 1 other draws of the defender's pairs,
    draw 0 being its row; the spread in the JSON and in the table."""
    out = tmp_path / "out"
    cli.main(["eval", "--attack", "badnets", "--defenses", "none", "fire-clamp", "fire-clamp-unpaired",
              "--epochs", "6", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-ablations",
              "--no-online", "--quiet", "--pair-draws", "3"])
    res = json.loads((out / "results.json").read_text())["runs"][0]
    draws = res["pair_draws"]
    rows = {r["defense"]: r for r in res["rows"]}
    assert draws["defense"] == "fire-clamp" and [d["draw"] for d in draws["draws"]] == [0, 1, 2]
    assert draws["draws"][0]["PA"] == rows["fire-clamp"]["PA"]
    assert all(d["PA"] > 0.8 and d["mode"] == "clamp" for d in draws["draws"])
    table = (out / "table.md").read_text()
    pa = [100 * d["PA"] for d in draws["draws"]]
    line = next(x for x in table.splitlines() if x.startswith("| badnets | fire-clamp | 3 |"))
    assert f"| {sum(pa) / 3:.1f} | {min(pa):.1f} | {max(pa):.1f} |" in line
    ca = rows["none"]["CA"]
    assert line.endswith(f"| {sum(d['PA'] >= 0.95 * ca for d in draws['draws'])} / 3 |")
    with pytest.raises(ValueError, match="pair_draws"):
        harness.run(harness.RunConfig(pair_draws=0), log=lambda *a: None)


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


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer_prefix", [("preact18", "layer"), ("vgg", "stage")])
def test_harness_on_the_other_architectures(tmp_path, arch, layer_prefix):
    cfg = harness.RunConfig(attack="badnets", model=arch, width=8, epochs=6, cache_dir=None, alphas=[1.0, 1.5],
                            defenses=["none", "fire-clamp"], ablations=False, online=False)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    rows = {r["defense"]: r for r in res["rows"]}
    assert rows["none"]["ASR"] > 0.9
    assert rows["fire-clamp"]["PA"] > 0.9 and rows["fire-clamp"]["CA"] >= rows["none"]["CA"] - 0.01
    # selection scored the architecture's own layers (the pixels, `input`, repair a patch too: the
    # choice between them depends on the thread count the model was trained with)
    tried = {name for e in res["fire"]["fire-clamp"]["evidence"] for name in e["layers"]}
    assert "input" in tried and sum(name.startswith(layer_prefix) for name in tried) >= 3


@pytest.mark.slow
def test_moving_patch_is_repaired_per_position(tmp_path):
    """The moving patch on the digits: selection picks the per-position form, which beats the
    flattened form at the same layers, that form given its own mode, tau and alpha by the same
    selection (measured: 97.5% against 0.8% PA, flattened's clamp at alpha 2)."""
    cfg = harness.RunConfig(attack="moving", epochs=8, cache_dir=None, alphas=[1.0, 2.0], layer_pairs=False,
                            defenses=["none", "fire-clamp"], online=False)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    rows = {r["defense"]: r for r in res["rows"]}
    assert rows["none"]["ASR"] > 0.9
    assert rows["fire-clamp"]["form"] == "per_position" and rows["fire-clamp"]["PA"] > 0.85
    other = next(r for r in res["ablations"] if r["ablation"].startswith("form=flattened"))
    assert rows["fire-clamp"]["PA"] > other["PA"] + 0.1
    assert other["mode"] == "clamp" and other["alpha"] in cfg.alphas and other["tau_quantile"] is not None


def test_cli_names_every_model_attack_and_data_set(capsys):
    """The command line's choices are the suite's models and data sets."""
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in [*models.MODELS, *data.DATASETS])
    assert set(cli.DEMO_ATTACKS) | set(cli.DEMO_VIT_ATTACKS) <= set(attacks.ATTACKS)


def test_vit_tokens_and_positional_layers():
    model = models.build("vit").eval()
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10) and models.channel_dim(model) == -1
    # input: pixels, flattened only; tokens: the embedded tokens before block1
    assert harness.positional_layers(model, model.REPAIRABLE, x) == ["tokens", *model.BLOCKS]
    assert isinstance(model.input, torch.nn.Identity) and isinstance(model.tokens, torch.nn.Identity)
    gap = models.build("vit-gap").eval()  # no class token: 64 patch tokens, classified from their mean
    feats = {}
    gap.block1.register_forward_hook(lambda m, i, o: feats.__setitem__("block1", o))
    assert gap(x).shape == (3, 10) and feats["block1"].shape == (3, 64, 64) and not hasattr(gap, "cls")
    assert harness.positional_layers(gap, gap.REPAIRABLE, x) == ["tokens", *gap.BLOCKS]
    torch.testing.assert_close(gap.pool(feats["block1"]), feats["block1"].mean(1))
    cnn = models.build("cnn").eval()
    assert harness.positional_layers(cnn, cnn.REPAIRABLE, x) == ["input", "block1", "block2", "block3"]
    assert models.channel_dim(cnn) == 1


@pytest.mark.parametrize("arch", ["vit", "vit-gap"])
def test_vit_tokens_layer_sees_a_trigger_token_at_one_position(arch):
    """`tokens` (the embedded tokens before block1) holds no weights, so checkpoints saved before it
    existed load; there a trigger token filling one patch cell moves that one token and no other:
    the local shift a per-position direction describes, before attention spreads it."""
    torch.manual_seed(0)
    model = models.build(arch).eval()
    assert not any(k.startswith("tokens") for k in model.state_dict())
    token = attacks.build("token")
    x = torch.rand(4, 3, 32, 32)
    feats = []
    model.tokens.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(x), model(token.apply(x))
    moved = (feats[1] - feats[0]).abs().amax(-1) > 1e-5  # (N, tokens)
    assert moved.sum(1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("arch", ["cnn", "preact18", "vgg"])
def test_input_layer_repairs_an_additive_trigger_at_the_pixels(arch):
    """`input` is an identity before the first layer: FIRE estimated there sees the pixels, and a
    shift by the paired mean difference undoes an additive trigger (SIG, away from clipping)."""
    import fire_repair as fr
    torch.manual_seed(0)
    model = models.build(arch, width=8).eval()
    assert model.REPAIRABLE[0] == "input" and isinstance(model.input, torch.nn.Identity)
    sig = attacks.build("sig")
    x = 0.2 + 0.6 * torch.rand(40, 3, 32, 32)  # no pixel clips under the +-40/255 sinusoid
    est = fr.Estimator(model, ["input"], k=1)
    est.observe(x[:24], poisoned=False)
    est.observe_pairs(x[:24], sig.apply(x[:24]))
    with torch.no_grad():
        out, triggered = model(x[24:]), model(sig.apply(x[24:]))
        fr.attach(model, est.profile(mode="shift", alpha=1.0))
        try:
            repaired = model(sig.apply(x[24:]))
        finally:
            fr.detach(model)
    assert (repaired - out).abs().max() < 1e-3 * (triggered - out).abs().max()


def test_vit_repaired_per_position_compiles_and_exports():
    import fire_repair as fr

    model = models.build("vit").eval()
    x = torch.rand(4, 3, 32, 32)
    # `tokens` (an Identity before attention) and a block: the CIFAR-10 token's headline is such a pair
    est = fr.Estimator(model, ["tokens", "block2"], per_position=True, channel_dim=-1)
    est.observe(x, poisoned=False)
    est.observe_pairs(x, attacks.build("badnets").apply(x))
    fr.attach(model, est.profile(mode="clamp"))
    try:
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True)(x)
            ep = torch.export.export(model, (x,))
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ep.module()(x), eager, rtol=1e-5, atol=1e-5)
        assert sum("fire.repair" in str(n.target) for n in ep.graph.nodes if n.op == "call_function") == 2
    finally:
        fr.detach(model)


@pytest.mark.slow
def test_harness_vit_badnets(tmp_path):
    cfg = harness.RunConfig(attack="badnets", model="vit", cache_dir=None, alphas=[1.0, 1.5], layers=["block1"],
                            defenses=["none", "fire-clamp"], ablations=False, online=False)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    rows = {r["defense"]: r for r in res["rows"]}
    assert rows["none"]["ASR"] > 0.9
    assert rows["fire-clamp"]["PA"] > 0.9 and rows["fire-clamp"]["CA"] >= rows["none"]["CA"] - 0.01
    assert {e["form"] for e in res["fire"]["fire-clamp"]["evidence"]} == {"flattened", "per_position"}


@pytest.mark.slow
def test_harness_vit_trigger_token_is_repaired_per_position():
    """A trigger token at a random position on the ViT: a (K, C) profile over the token
    features after the first encoder block, applied at every token, repairs it (measured with
    the harness's defaults: 96.2 % PA, CA 96.7 %, the same 16 pairs)."""
    cfg = harness.RunConfig(attack="token", model="vit", cache_dir=None, alphas=[1.0, 1.5, 2.0], layers=["block1"],
                            layer_pairs=False, forms=["per_position"], defenses=["none", "fire-clamp"],
                            ablations=False, online=False)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    rows = {r["defense"]: r for r in res["rows"]}
    assert rows["none"]["ASR"] > 0.9
    fire = rows["fire-clamp"]
    assert fire["form"] == "per_position" and fire["PA"] > 0.9 and fire["CA"] >= rows["none"]["CA"] - 0.01
    profile = res["fire"]["fire-clamp"]["evidence"][0]
    assert profile["layers"] == ["block1"] and profile["form"] == "per_position"


def test_fire_defense_chooses_among_the_layer_sets_it_is_given(backdoored_moving):
    """`fit(layer_sets=...)` (the form ablation's own choice): selection scores those sets only,
    in the run's forms, and still chooses alpha and tau itself."""
    b = backdoored_moving
    held = harness.Held(clean=b["hold_clean"], pairs=tuple(p[:16] for p in b["hold_pairs"]),
                        flagged=b["hold_pairs"][1][16:48])
    cfg = harness.RunConfig(attack="moving", forms=["flattened"], alphas=[1.0, 2.0])
    fit = harness.FireDefense(("clamp",)).fit(b["model"], held.clean, held, cfg, layers=["input", "block1", "block2"],
                                              layer_sets=[["block1", "block2"]])
    evidence = fit.report()["evidence"]
    assert {tuple(e["layers"]) for e in evidence} == {("block1", "block2")}
    assert {e["form"] for e in evidence} == {"flattened"} and {e["alpha"] for e in evidence} == {1.0, 2.0}
    assert fit.selection.layers == ["block1", "block2"] and fit.selection.alpha in (1.0, 2.0)


def test_clean_reference_leaves_out_the_inferred_target(backdoored):
    clean = backdoored["hold_clean"]
    poisoned = backdoored["hold_pairs"][1][:16]
    kept, target = harness.clean_reference(backdoored["model"], clean, poisoned)
    assert target == backdoored["attack"].target  # inferred from predictions, no labels
    from fire_eval.metrics import predict
    assert len(kept) < len(clean) and not (predict(backdoored["model"], kept) == target).any()
    same, none = harness.clean_reference(backdoored["model"], clean, poisoned, match=False)
    assert none is None and same is clean


# ----------------------------------------------------------------------------- image folders

def _image_tree(root, classes=("cat", "dog"), per_class=2, size=32, splits=("train", "test")):
    from PIL import Image

    for split in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                name = f"{i:04d}.jpg" if size == 32 else f"{i}.png"
                Image.new("RGB", (size, size), (200 * c, 50, 100)).save(d / name)


def test_image_folders_labels_from_sorted_class_names(tmp_path):
    _image_tree(tmp_path, classes=("dog", "cat"), size=32)
    ds = data.load("folder", tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.y_train.tolist() == [0, 0, 1, 1]
    assert ds.x_train[0, 0].mean() > 0.7 and ds.x_train[2, 0].mean() < 0.1  # cat (made with red 200) is class 0


def test_image_folders_resize_other_sizes_and_cache(tmp_path):
    _image_tree(tmp_path / "d", size=48)
    ds = data.image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert ds.x_test.shape == (4, 3, 32, 32)
    cached = list((tmp_path / "cache").glob("images-*.safetensors"))
    assert len(cached) == 2  # train and test
    again = data.image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert torch.equal(again.x_train, ds.x_train)


def test_cifar10_accepts_the_image_folder_layout(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _image_tree(tmp_path / "cifar10", classes=classes, per_class=1)
    ds = data.cifar10(tmp_path)  # finds cifar10/train and cifar10/test
    assert ds.name == "cifar10" and ds.classes == classes and ds.y_train.tolist() == list(range(10))
    _image_tree(tmp_path / "three", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(ValueError, match="CIFAR-10 has 10"):
        data.cifar10(tmp_path / "three")


def test_image_folder_errors_name_the_file(tmp_path):
    _image_tree(tmp_path / "a", splits=("train",))
    with pytest.raises(FileNotFoundError, match="test"):
        data.image_folder(tmp_path / "a")
    _image_tree(tmp_path / "b", classes=("cat", "dog"))
    (tmp_path / "b" / "test" / "dog").rename(tmp_path / "b" / "test" / "wolf")
    with pytest.raises(ValueError, match="wolf"):
        data.image_folder(tmp_path / "b")
    _image_tree(tmp_path / "c")
    (tmp_path / "c" / "train" / "cat" / "0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="0000.jpg is not a readable image"):
        data.image_folder(tmp_path / "c")
    (tmp_path / "e" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        data.image_folder(tmp_path / "e")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet", tmp_path)


# ----------------------------------------------------------------------------- GTSRB as users keep it

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"


def _sign(size, roi, scale=1.0):
    """A red sign inside roi (inclusive corners, in original pixels) on blue, stored at size*scale."""
    from PIL import Image

    im = Image.new("RGB", (size, size), (0, 0, 255))
    x1, y1, x2, y2 = roi
    im.paste((255, 0, 0), (x1, y1, x2 + 1, y2 + 1))
    if scale != 1.0:
        im = im.resize((round(size * scale), round(size * scale)), Image.NEAREST)
    return im


def _gtsrb_tree(root, labelled_at="images", scale=1.0, unlabelled=True):
    size, roi = 64, (8, 8, 55, 55)
    train = root / "GTSRB" / "Final_Training" / "Images"
    test = root / "GTSRB" / "Final_Test" / "Images"
    row = f"{size};{size};{';'.join(map(str, roi))}"
    for c in (0, 3):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        _sign(size, roi, scale).save(d / "00000_00000.ppm")
        (d / f"GT-{c:05d}.csv").write_text(f"{HEADER};ClassId\n00000_00000.ppm;{row};{c}\n")
    test.mkdir(parents=True)
    _sign(size, roi, scale).save(test / "00000.ppm")
    if unlabelled:  # what GTSRB_Final_Test_Images.zip ships: no ClassId
        (test / "GT-final_test.test.csv").write_text(f"{HEADER}\n00000.ppm;{row}\n")
    where = {"images": test, "final_test": test.parent, "root": root}.get(labelled_at)
    if where is not None:
        (where / "GT-final_test.csv").write_text(f"{HEADER};ClassId\n00000.ppm;{row};3\n")


@pytest.mark.parametrize("labelled_at", ["images", "final_test", "root"])
def test_gtsrb_finds_the_labelled_test_csv_wherever_it_was_unpacked(tmp_path, labelled_at):
    _gtsrb_tree(tmp_path, labelled_at)
    ds = data.gtsrb(tmp_path)
    assert ds.y_train.tolist() == [0, 3] and ds.y_test.tolist() == [3] and ds.num_classes == 43


def test_gtsrb_without_labels_is_a_clear_error(tmp_path):
    _gtsrb_tree(tmp_path, labelled_at=None)
    with pytest.raises(FileNotFoundError, match="GT-final_test.csv.*has no ClassId"):
        data.gtsrb(tmp_path)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gtsrb_crops_the_roi_scaled_to_the_stored_size(tmp_path, scale):
    """Stored at 32x32 while the CSV keeps 64x64 and its ROI: the crop is the sign, not black."""
    _gtsrb_tree(tmp_path, scale=scale)
    ds = data.gtsrb(tmp_path)
    for x in (ds.x_train[0], ds.x_test[0]):
        assert x[0].min() > 0.8 and x[2].max() < 0.2  # red everywhere: no black padding, no blue border


def test_gtsrb_malformed_files_are_clear_errors(tmp_path):
    _gtsrb_tree(tmp_path)
    gt = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00003" / "GT-00003.csv"
    gt.write_text("Filename;Width\n00000_00000.ppm;64\n")
    with pytest.raises(ValueError, match="GT-00003.csv lacks the column"):
        data.gtsrb(tmp_path)
    gt.write_text(f"{HEADER};ClassId\nmissing.ppm;64;64;8;8;55;55;3\n")
    with pytest.raises(FileNotFoundError, match="missing.ppm"):
        data.gtsrb(tmp_path)
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="GT-00003.csv"):
        data.gtsrb(tmp_path)


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
    # base's stale where it refits that defence without them; a dropped defence takes them along
    def draws(pa):
        return {"defense": "fire-clamp", "n_pairs": 16, "draws": [{"draw": 0, "CA": 0.8, "ASR": 1 - pa, "PA": pa}]}

    def merge(b, u, drop=()):
        return report.update_runs([b], [u], drop)[0]

    with_draws = {**base, "pair_draws": draws(0.7)}
    assert merge(with_draws, run([("none", 0.02), ("fire", 0.75)]))["pair_draws"] == draws(0.7)
    assert "pair_draws" not in merge(with_draws, update)  # fire-clamp refitted, no draws
    assert merge(with_draws, {**update, "pair_draws": draws(0.72)})["pair_draws"] == draws(0.72)
    assert "pair_draws" not in merge(with_draws, run([("none", 0.02), ("fire", 0.75)]), drop=["fire-clamp"])
    # an update of another defence than the headline leaves the headline's AUROC
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
