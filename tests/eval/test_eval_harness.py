"""The evaluation harness end to end: attacks, models, FIRE and the baselines, pair draws."""
import json

import pytest
import torch

from fire_eval import attacks, cli, harness, models, report


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
    # a reference row, marked so in the JSON (the plot hatches it); no defense row is
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
def test_harness_runs_a_hugging_face_vit_as_it_is(tmp_path):
    """`hf-vit`: transformers' ViTForImageClassification, its own module names and outputs."""
    pytest.importorskip("transformers")
    model = models.build("hf-vit")
    assert model.REPAIRABLE[:2] == ["input", "hf.vit.embeddings"] and len(model.BLOCKS) == 4
    assert set(model.REPAIRABLE) <= dict(model.named_modules()).keys()
    cfg = harness.RunConfig(attack="badnets", model="hf-vit", epochs=1, cache_dir=None, alphas=[1.0],
                            defenses=["none", "fire-clamp"], ablations=False, online=False, n_eval=64)
    res = harness.run(cfg, progress=False, log=lambda *a: None)
    tried = {name for e in res["fire"]["fire-clamp"]["evidence"] for name in e["layers"]}
    assert {"input", "hf.vit.embeddings", *model.BLOCKS} <= tried
    forms = {e["form"] for e in res["fire"]["fire-clamp"]["evidence"] if list(e["layers"]) == ["hf.vit.embeddings"]}
    assert forms == {"flattened", "per_position"}


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


def test_the_harness_defaults_are_the_recipe():
    """The harness's FIRE runs fr.fit with fr.FitConfig's defaults: one recipe, not two copies."""
    import dataclasses

    import fire_repair as fr

    ours = harness.fit_config(harness.RunConfig(), None, ["input"], ("clamp",))
    recipe = fr.FitConfig()
    differ = {f.name for f in dataclasses.fields(recipe) if getattr(ours, f.name) != getattr(recipe, f.name)}
    assert differ == {"layers", "modes"}  # what each run names: its model's layers and the mode of the row
