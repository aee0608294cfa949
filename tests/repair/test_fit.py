"""fr.fit (the recommended recipe in one call), candidate layers found in the model, the clean
coverage check, and layers whose output is a tuple or a ModelOutput."""
import warnings

import pytest
import torch
from torch import nn

import fire_repair as fr
from fire_repair.selection import choose


def _rates(model, b):
    pa = (fr.predict(model, b["eval_poison"]) == b["eval_poison_y"]).float().mean().item()
    ca = (fr.predict(model, b["eval_clean"]) == b["eval_y"]).float().mean().item()
    asr = (fr.predict(model, b["eval_poison"]) == b["attack"].target).float().mean().item()
    return ca, pa, asr


def test_candidate_layers_are_the_stages_shallow_to_deep(backdoored):
    model = backdoored["model"]
    found = fr.candidate_layers(model, backdoored["hold_clean"][:2])
    # SmallCNN: its `input` identity exposes the pixels and comes first; head (the logits) is not a
    # candidate; fc keeps its ReLU
    assert found == ["input", "block1", "block2", "block3", "fc"]
    assert fr.candidate_layers(model, backdoored["hold_clean"][:2], max_layers=2) == ["input", "fc"]
    with pytest.raises(ValueError, match="max_layers"):
        fr.candidate_layers(model, backdoored["hold_clean"][:2], max_layers=0)


def test_candidate_layers_look_into_a_backbone_and_its_block_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.f(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.stem = nn.Linear(4, 8)
            self.backbone.blocks = nn.ModuleList([Block() for _ in range(5)])
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.backbone.stem(x)
            for blk in self.backbone.blocks:
                h = blk(h)
            return self.head(h)

    found = fr.candidate_layers(Net(), torch.randn(2, 4))
    assert found == ["backbone.stem", *(f"backbone.blocks.{i}" for i in range(5))]
    assert fr.candidate_layers(Net(), torch.randn(2, 4), max_layers=3) == \
        ["backbone.stem", "backbone.blocks.1", "backbone.blocks.4"]


@pytest.mark.slow
def test_with_input_layer_exposes_the_pixels_as_a_candidate():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net.custom = "kept"
    x = torch.randn(5, 3, 8, 8)
    assert "input" not in fr.candidate_layers(net, x)  # a parameter-free module that is not an identity
    model = fr.with_input_layer(net.eval())
    assert not model.training and model.model is net and model.custom == "kept"
    assert torch.equal(model(x), net(x)) and set(model.state_dict()) == {f"model.{k}" for k in net.state_dict()}
    assert fr.candidate_layers(model, x)[0] == "input"
    with pytest.raises(ValueError, match="already has an input layer"):
        fr.with_input_layer(model)
    # a repair at `input` acts on the pixels: the profile attaches there like at any layer
    est = fr.Estimator(model, ["input"], k=1)
    est.observe_pairs(x, x + torch.ones_like(x))
    est.observe(torch.randn(64, 3, 8, 8), poisoned=False)
    with fr.attached(model, est.profile(mode="clamp", alpha=1.0)), torch.no_grad():
        with fr.capture(model) as cap:
            model(x + 1)
        assert cap.score("input").shape == (5,)


def test_fit_with_pairs_repairs_with_found_layers(backdoored):
    b = backdoored
    model = b["model"]
    ca0, pa0, asr0 = _rates(model, b)
    pairs = tuple(t[:16] for t in b["hold_pairs"])
    res = fr.fit(model, b["hold_clean"], pairs=pairs)
    assert res.paired and res.layers == ["input", "block1", "block2", "block3", "fc"]
    assert res.choice["mode"] in fr.recipe.PAIRED_MODES and set(res.choice["layers"]) <= set(res.layers)
    assert res.profile.info["coverage"]["n_seen"] == 10
    assert "predicted classes 10 of 10" in res.table() and " *" in res.table()
    with fr.attached(model, res.profile):
        ca, pa, asr = _rates(model, b)
    assert pa0 < 0.1 and pa > ca0 - 0.05 and asr < 0.05 and ca >= ca0 - 0.01
    assert _rates(model, b) == (ca0, pa0, asr0)  # detached on exit


@pytest.mark.slow
def test_fit_unpaired_and_its_knobs(backdoored):
    b = backdoored
    model = b["model"]
    ca0, _, _ = _rates(model, b)
    flagged = b["hold_pairs"][1][:64]
    res = fr.fit(model, b["hold_clean"], flagged=flagged, layers=["block2", "block3"], layer_pairs=False,
                 forms=("flattened",), modes=("clamp",), unpaired_alphas=(1.0, 2.0))
    assert not res.paired and res.choice["form"] == "flattened" and res.choice["mode"] == "clamp"
    assert {tuple(e["layers"]) for e in res.selection.evidence} == {("block2",), ("block3",)}
    assert {e["alpha"] for e in res.selection.evidence} == {1.0, 2.0}
    with fr.attached(model, res.profile):
        ca, pa, _ = _rates(model, b)
    assert pa > ca0 - 0.1 and ca >= ca0 - 0.01


@pytest.mark.slow
def test_fit_per_position_only_leaves_out_layers_without_positions(backdoored):
    """forms=("per_position",) with the found layers: fc has no positions, so no set holding it
    is a candidate (it used to raise that the estimator does not watch fc); named sets that no
    form can repair are still refused."""
    b = backdoored
    model = b["model"]
    pairs = tuple(t[:16] for t in b["hold_pairs"])
    res = fr.fit(model, b["hold_clean"], pairs=pairs, forms=("per_position",), modes=("clamp",), alphas=(1.0,))
    offered = {tuple(e["layers"]) for e in res.selection.evidence}
    assert offered and all("fc" not in s for s in offered) and ("block3",) in offered
    assert {e["form"] for e in res.selection.evidence} == {"per_position"}
    with pytest.raises(ValueError, match="can be repaired in the forms"):
        fr.fit(model, b["hold_clean"], pairs=pairs, forms=("per_position",), sets=[["fc"]])


def test_fit_refuses_inconsistent_data(backdoored):
    b = backdoored
    model, clean, pairs = b["model"], b["hold_clean"], b["hold_pairs"]
    with pytest.raises(ValueError, match="exactly one"):
        fr.fit(model, clean)
    with pytest.raises(ValueError, match="exactly one"):
        fr.fit(model, clean, pairs=pairs, flagged=pairs[1])
    with pytest.raises(ValueError, match="equal shapes"):
        fr.fit(model, clean, pairs=(pairs[0][:4], pairs[1][:5]))
    with pytest.raises(ValueError, match="empty"):
        fr.fit(model, clean[:0], flagged=pairs[1][:8])
    with pytest.raises(ValueError, match="shape"):
        fr.fit(model, clean, flagged=pairs[1][:8, :, :16])
    with pytest.raises(TypeError):
        fr.fit(model, clean, flagged=pairs[1][:8], no_such_knob=1)


@pytest.mark.slow
def test_fit_warns_and_records_a_thin_clean_coverage(backdoored):
    """A clean set drawn from two classes: fit says so, and the evidence carries it."""
    b = backdoored
    model = b["model"]
    pred = fr.predict(model, b["hold_clean"])
    skewed = b["hold_clean"][(pred == 3) | (pred == 5)]
    with pytest.warns(UserWarning, match="2 of the model's 10 classes"):
        res = fr.fit(model, skewed, pairs=tuple(t[:16] for t in b["hold_pairs"]), layers=["block2"],
                     forms=("flattened",), modes=("clamp",), alphas=(1.0,))
    assert res.coverage["thin"] and res.coverage["classes"] == [3, 5]
    assert res.profile.info["coverage"]["n_seen"] == 2 and "thin" in res.table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a covering clean set: no warning
        fr.fit(model, b["hold_clean"], pairs=tuple(t[:16] for t in b["hold_pairs"]), layers=["block2"],
               forms=("flattened",), modes=("clamp",), alphas=(1.0,))


def test_choose_refuses_a_candidate_that_wrecks_one_class():
    ev = [{"layers": ["a"], "agreement": 1.0, "margin": 5.0, "clean_change": 0.005, "worst_class_cost": 0.3},
          {"layers": ["b"], "agreement": 0.9, "margin": 1.0, "clean_change": 0.005, "worst_class_cost": 0.01}]
    assert choose(ev, 0.01)["layers"] == ["a"]  # the mean alone hides the class
    assert choose(ev, 0.01, max_class_cost=0.1)["layers"] == ["b"]


def test_worst_class_is_measured_per_predicted_class():
    from fire_repair.selection import MIN_CLASS_ROWS, worst_class

    pred = torch.tensor([0] * 10 + [1] * 10 + [2] * (MIN_CLASS_ROWS - 1))
    cost = torch.cat([torch.zeros(10), torch.full((10,), 0.4), torch.ones(MIN_CLASS_ROWS - 1)])
    assert worst_class(cost, pred) == (pytest.approx(0.4), 1)  # class 2 has too few rows to count


# ----------------------------------------------------------------------------- tuple outputs

class _TupleBlock(nn.Module):
    """Returns (hidden, aux) as transformer blocks do."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(6, 6)

    def forward(self, x):
        h = self.f(x)
        return h, h.sum(-1)


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TupleBlock()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, aux = self.block(x)
        return self.head(h) + aux[..., None] * 0


def _profile(model, layer, x, trig, **kw):
    est = fr.Estimator(model, [layer], **kw)
    est.observe(x, poisoned=False)
    est.observe_pairs(x[:16], trig[:16])
    return est.profile(mode="clamp", alpha=1.0)


def test_a_tuple_output_is_repaired_on_its_first_tensor_and_the_rest_passes_through():
    torch.manual_seed(0)
    model = _TupleNet().eval()
    x = torch.randn(64, 6)
    trig = x + 3.0 * torch.eye(6)[0]
    profile = _profile(model, "block", x, trig)
    h, aux = model.block(trig)
    fr.attach(model, profile)
    rh, raux = model.block(trig)
    assert torch.equal(raux, aux)  # untouched
    layer = profile.layers[0]
    expect = torch.ops.fire.repair(h, layer.directions, layer.alpha, layer.center, layer.tau, "clamp")
    assert torch.allclose(rh, expect) and not torch.allclose(rh, h)
    with fr.capture(model) as cap:
        model(trig)
    assert torch.equal(cap.inputs["block"], h)
    fr.detach(model)
    assert torch.equal(model.block(trig)[0], h)


def test_an_lstm_is_repaired_per_position_on_its_output_sequence():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.lstm = nn.LSTM(4, 8, batch_first=True)
    x = torch.randn(48, 5, 4)
    trig = x.clone()
    trig[:, 2] += 4.0
    profile = _profile(model, "lstm", x, trig, per_position=True, channel_dim=-1)
    out, (hn, cn) = model.lstm(trig)
    fr.attach(model, profile)
    rout, (rhn, rcn) = model(trig)
    assert rout.shape == out.shape and torch.equal(rhn, hn) and torch.equal(rcn, cn)
    assert not torch.equal(rout, out)
    fr.detach(model)


def test_any_other_output_is_refused_naming_the_layer():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"h": x}

    model = nn.Sequential()
    model.odd = DictOut()
    est = fr.Estimator(model, ["odd"])
    with pytest.raises(TypeError, match="layer 'odd' returns dict"):
        est.observe(torch.randn(4, 3), poisoned=False)


# ----------------------------------------------------------------------------- Hugging Face

def _tiny_hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=64, num_labels=4)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


@pytest.mark.filterwarnings("ignore:the clean images are predicted")  # an untrained model: few classes
def test_a_hugging_face_vit_end_to_end():
    """Built from a small config (no download): found layers, fit, attach, capture, detach, export."""
    model = _tiny_hf_vit()
    torch.manual_seed(1)
    x = torch.rand(96, 3, 16, 16)
    trig = x.clone()
    trig[:, :, :4, :4] = 1.0  # a patch over one token
    found = fr.candidate_layers(model, x[:2])
    # the embeddings, each of the three blocks (named by the transformers version), the final norm
    assert found[0] == "vit.embeddings" and found[-1] == "vit.layernorm" and len(found) == 5
    assert [name[-1] for name in found[1:4]] == ["0", "1", "2"] and "classifier" not in found
    before = model(trig).logits
    res = fr.fit(model, x[16:], pairs=(x[:16], trig[:16]), alphas=(1.0, 2.0), modes=("clamp",))
    assert set(res.choice["layers"]) <= set(found)
    with fr.attached(model, res.profile):
        out = model(trig)
        assert type(out).__name__ == "ImageClassifierOutput" and out.logits.shape == (96, 4)
        with fr.capture(model) as cap:
            model(trig)
        layer = res.choice["layers"][0]
        assert cap.inputs[layer].shape[0] == 96 and cap.score(layer).shape == (96,)
        program = torch.export.export(model, (trig[:4],))
        assert torch.allclose(program.module()(trig[:4]).logits, out.logits[:4], atol=1e-5)
    assert torch.equal(model(trig).logits, before)
