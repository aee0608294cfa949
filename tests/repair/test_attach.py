"""attach / detach on a trained backdoored model: buffers, dtypes, compile, export, exact detach."""
from collections import OrderedDict

import pytest
import torch

import fire_repair as fr
from fire_eval.metrics import auroc, predict


@pytest.fixture
def repaired(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"], k=1)
    est.observe(backdoored["hold_clean"], poisoned=False)
    est.observe_pairs(*backdoored["hold_pairs"])
    profile = est.profile(mode="clamp")
    yield model, profile
    fr.detach(model)


def test_attach_repairs_and_detach_restores_bit_for_bit(backdoored, repaired):
    model, profile = repaired
    x = backdoored["eval_poison"][:64]
    before = model(x)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    fr.attach(model, profile)
    assert not torch.equal(model(x), before)
    keys = set(model.state_dict())
    assert {"block2.fire_repair.directions", "block2.fire_repair.alpha", "block2.fire_repair.center",
            "block2.fire_repair.tau"} <= keys
    fr.detach(model)
    assert torch.equal(model(x), before)
    assert set(model.state_dict()) == set(params)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params.items())
    assert not hasattr(model.block2, "fire_repair") and isinstance(model.block2, torch.nn.Sequential)


def test_sequential_layer_is_repaired_once(backdoored, repaired):
    model, profile = repaired
    x = backdoored["eval_poison"][:16]
    fr.attach(model, profile)
    h = model.block2.layer(model.block1(x))
    expected = model.head(model.fc(model.block3(fr.repair_modules(model)["block2"](h))))
    torch.testing.assert_close(model(x), expected)


def test_state_dict_keeps_original_keys_and_loads(backdoored, repaired):
    model, profile = repaired
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fr.attach(model, profile)
    sd = model.state_dict()
    assert set(sd) - set(original) == {f"block2.fire_repair.{b}" for b in
                                       ("directions", "alpha", "center", "tau", "score_scale")}
    model.load_state_dict(sd)  # round trip while attached
    assert fr.fingerprint(model) == profile.fingerprint


def test_attaching_twice_is_an_error(repaired):
    model, profile = repaired
    fr.attach(model, profile)
    with pytest.raises(RuntimeError, match="already repaired"):
        fr.attach(model, profile)


def test_dtype_and_device_moves(backdoored, repaired):
    model, profile = repaired
    fr.attach(model, profile)
    x = backdoored["eval_poison"][:16]
    ref = model(x)
    directions = model.block2.fire_repair.directions.clone()
    low = model.to(torch.bfloat16)
    # the repair's tensors move but are not rounded: the kernels compute in fp32 anyway
    assert low.block2.layer[0][0].weight.dtype == torch.bfloat16
    assert torch.equal(low.block2.fire_repair.directions, directions)
    out = low(x.bfloat16())
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9
    model.to(torch.float32)


def test_compile_fullgraph_and_export(backdoored, repaired):
    model, profile = repaired
    fr.attach(model, profile)
    x = backdoored["eval_poison"][:32]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    ep = torch.export.export(model, (x,))
    assert any("fire.repair" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_scores_detect_the_trigger(backdoored, repaired):
    model, profile = repaired
    fr.attach(model, profile)
    module = fr.repair_modules(model)["block2"]
    acts = {}
    hook = model.block2.register_forward_hook(lambda m, i, o: acts.__setitem__("h", o))  # runs before the repair
    with torch.no_grad():
        model(backdoored["eval_poison"])
        pos = module.backdoor_scores(acts["h"])
        model(backdoored["eval_clean"])
        neg = module.backdoor_scores(acts["h"])
    hook.remove()
    assert auroc(pos, neg) > 0.95


def test_capture_gives_inputs_projections_and_scores_then_restores(backdoored, repaired):
    model, profile = repaired
    fr.attach(model, profile)
    x = backdoored["eval_poison"][:8]
    with torch.no_grad():
        plain = model(x)
        with fr.capture(model) as cap:
            captured = model(x)
    torch.testing.assert_close(captured, plain)  # the same repair, scores from the same pass
    module = fr.repair_modules(model)["block2"]
    assert cap.inputs["block2"].shape[0] == 8 and cap.projections["block2"].shape == (8, 1)
    torch.testing.assert_close(cap.score("block2"), module.backdoor_scores(cap.inputs["block2"]))
    assert module._capture is None  # restored: later forwards record nothing
    with pytest.raises(KeyError, match="no forward pass"):
        cap.score("block1")
    with fr.capture(model), pytest.raises(RuntimeError, match="nested"):
        with fr.capture(model):
            pass
    fr.detach(model)
    with pytest.raises(RuntimeError, match="no repair is attached"):
        with fr.capture(model):
            pass


def test_repair_recovers_labels_and_keeps_clean_accuracy(backdoored, repaired):
    model, profile = repaired
    before_ca = (predict(model, backdoored["eval_clean"]) == backdoored["eval_y"]).float().mean()
    fr.attach(model, profile)
    ca = (predict(model, backdoored["eval_clean"]) == backdoored["eval_y"]).float().mean()
    pa = (predict(model, backdoored["eval_poison"]) == backdoored["eval_poison_y"]).float().mean()
    assert pa > 0.9 and ca >= before_ca - 0.01


@pytest.mark.parametrize("order", [["feat", "feat.0"], ["feat.0", "feat"]])
def test_parent_and_child_both_repair_whatever_the_order(order):
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(feat=torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU()),
                                            head=torch.nn.Linear(6, 2)))
    layers = []
    for name in order:
        V = torch.zeros(1, 6)
        V[0, 0] = 1.0
        layers.append(fr.LayerProfile(name=name, mode="shift", directions=V, alpha=torch.ones(1),
                                     center=torch.zeros(6)))
    x = torch.randn(4, 6)
    with torch.no_grad():
        plain = model.feat(x)
        fr.attach(model, fr.Profile(layers=layers), check_fingerprint=False)
        assert sorted(fr.repair_modules(model)) == ["feat", "feat.0"]
        got = model.feat(x)
    # feat.0's shift passes through the ReLU, then feat's shift: both ran
    e0 = torch.tensor([1.0, 0, 0, 0, 0, 0])
    expected = torch.relu(model.feat.layer[0].layer(x) - e0) - e0
    torch.testing.assert_close(got, expected)
    fr.detach(model)
    assert not fr.repair_modules(model)
    torch.testing.assert_close(model.feat(x), plain)
