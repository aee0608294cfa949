"""Hardening, round two: values that pass the checks but break the repair, the library never
changing or misreading the model, estimator checkpoints and merges, selection inputs, and
errors that say what is wrong."""
import copy

import pytest
import torch
from torch import nn

import fire_repair as fr
from fire_repair.profile import LayerProfile, Profile, ProfileError


def _layer(mode="invert", **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(name="l", mode=mode, directions=torch.randn(2, 8, generator=g), alpha=torch.ones(2),
                center=torch.zeros(8), tau=torch.zeros(2) if mode in fr.TAU_MODES else None,
                slope=torch.full((2,), 0.1) if mode == "invert" else None)
    args.update(kw)
    return LayerProfile(**args)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


# ----------------------------------------------------------------------------- value rules

def test_partial_state_dict_is_checked_as_it_will_be_after_loading():
    module = fr.RepairModule(_layer(slope=torch.full((2,), -0.5), alpha=torch.full((2,), 0.5)))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="0.05"):  # 1 + 2 * 4 * (-0.5) < 0.05: alpha alone must be checked
        module.load_state_dict({"alpha": torch.full((2,), 4.0)}, strict=False)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    module.load_state_dict({"alpha": torch.full((2,), 0.4)}, strict=False)  # a usable subset loads
    assert torch.equal(module.alpha, torch.full((2,), 0.4))


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_score_scale_must_be_positive_everywhere(scale):
    bad = torch.tensor([1.0, scale])
    with pytest.raises(ProfileError, match="score_scale"):
        _layer(score_scale=bad)
    module = fr.RepairModule(_layer())
    with pytest.raises(ValueError, match="score_scale"):
        module.load_state_dict({"score_scale": bad}, strict=False)
    module.score_scale.data.copy_(bad)
    with pytest.raises(ValueError, match="score_scale"):
        module.check()


def test_tau_minus_inf_is_refused_in_clamp_only():
    bad = torch.tensor([float("-inf"), 0.0])
    with pytest.raises(ProfileError, match="tau"):
        _layer("clamp", tau=bad)
    _layer("gated", tau=bad)  # gated: every row flagged, a finite shift
    module = fr.RepairModule(_layer("clamp"))
    with pytest.raises(ValueError, match="tau"):
        module.load_state_dict({"tau": bad}, strict=False)


def test_alpha_and_slope_are_checked_in_fp32():
    big = torch.full((2,), 1e20)
    with pytest.raises(ProfileError, match="float32"):
        _layer(alpha=big, slope=big)
    module = fr.RepairModule(_layer())
    with pytest.raises(ValueError, match="float32"):
        module.load_state_dict({"alpha": big, "slope": big}, strict=False)


def test_alpha_times_directions_must_stay_finite_in_fp32():
    with pytest.raises(ProfileError, match="float32"):
        _layer("shift", alpha=torch.full((2,), 1e30), directions=torch.full((2, 8), 1e10))


def test_profile_file_re_hashed_with_bad_values_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fire_repair.profile import _digest

    model = nn.Linear(8, 8)
    layer = LayerProfile("", "clamp", torch.randn(1, 8), torch.ones(1), torch.zeros(8), tau=torch.zeros(1),
                         score_scale=torch.ones(1))
    Profile([layer], fingerprint=fr.fingerprint(model)).save(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.score_scale"] = torch.tensor([-1.0])
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(tmp_path / "q.safetensors"), metadata=meta)
    with pytest.raises(ProfileError, match="score_scale"):
        Profile.load(tmp_path / "q.safetensors")


def test_check_repairs_applies_the_same_rules():
    model = nn.Sequential(nn.Linear(8, 8))
    fr.attach(model, Profile([_layer(name="0")], fingerprint=fr.fingerprint(model)))
    module = fr.repair_modules(model)["0"]
    module.alpha.data.fill_(1e20)
    module.slope.data.fill_(1e20)
    with pytest.raises(ValueError, match="float32"):
        fr.check_repairs(model)


# ----------------------------------------------------------------------------- the model is never changed

def _estimator(model=None, **kw):
    model = model or _model()
    est = fr.Estimator(model, ["1"], **kw)
    g = torch.Generator().manual_seed(1)
    est.observe(torch.randn(32, 6, generator=g), poisoned=False)
    est.observe(torch.randn(16, 6, generator=g) + 2.0, poisoned=True)
    return est


def test_online_step_runs_the_model_in_eval_mode_and_restores_its_mode():
    model = _model()
    est = _estimator(model)
    online = fr.Online(est, mode="clamp", threshold=3.0)
    model.train()
    fp = fr.fingerprint(model)
    online.step(torch.randn(8, 6) + 3.0)
    assert model.training
    assert fr.fingerprint(model) == fp  # BatchNorm's running statistics unchanged
    online.close()


def test_estimator_made_after_attach_sees_the_layers_own_output():
    model = _model().eval()
    est = _estimator(model)
    profile = est.profile(mode="shift", alpha=1.0)
    x = torch.randn(16, 6) + 2.0
    fr.attach(model, profile)
    late = fr.Estimator(model, ["1"])
    late.observe(x, poisoned=True)
    fr.detach(model)
    ref = fr.Estimator(model, ["1"])
    ref.observe(x, poisoned=True)
    torch.testing.assert_close(late.stats["1"].sum_poison, ref.stats["1"].sum_poison)


def test_inference_mode_forward_leaves_buffers_usable():
    layer = LayerProfile("l", "project", torch.randn(2, 3, 4, 4), torch.ones(2), torch.zeros(3, 4, 4))
    module = fr.RepairModule(layer)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        module(x)
    for name in module.BUFFERS:
        t = getattr(module, name)
        assert t is None or not t.is_inference(), name
    y = x.clone().requires_grad_()
    module(y).sum().backward()
    module.load_layer(layer)
    module.load_state_dict(module.state_dict())


def test_deepcopy_inside_capture_is_not_capturing():
    model = nn.Sequential(nn.Linear(8, 8))
    fr.attach(model, Profile([_layer("clamp", name="0")], fingerprint=fr.fingerprint(model)))
    with fr.capture(model):
        clone = copy.deepcopy(model)
    assert all(m._capture is None for m in fr.repair_modules(clone).values())
    with fr.capture(clone) as cap:  # not "already being captured"
        clone(torch.randn(2, 8))
    assert "0" in cap.projections


# ----------------------------------------------------------------------------- empty batches and unclear errors

def test_capture_score_after_an_empty_batch():
    model = nn.Sequential(nn.Linear(8, 8))
    fr.attach(model, Profile([_layer("clamp", name="0")], fingerprint=fr.fingerprint(model)))
    with fr.capture(model) as cap:
        model(torch.randn(0, 8))
    assert cap.score("0").shape == (0,)


def test_online_step_on_an_empty_batch():
    model = _model().eval()
    online = fr.Online(_estimator(model), mode="clamp")
    out, flags = online.step(torch.randn(0, 6))
    assert out.shape == (0, 3) and flags.shape == (0,)
    online.close()


def test_observe_empty_batch_with_empty_mask():
    est = _estimator()
    est.observe(torch.randn(0, 6), poisoned=[])


def test_augment_that_changes_the_batch_size_is_refused_clearly():
    est = fr.Estimator(_model(), ["1"], augment=lambda x: x[:-1])
    with pytest.raises(ValueError, match="augment"):
        est.observe(torch.randn(4, 6), poisoned=[True, False, True, False])


def test_profile_load_accepts_bytes_paths(tmp_path):
    model = nn.Linear(8, 8)
    layer = LayerProfile("", "project", torch.randn(1, 8), torch.ones(1), torch.zeros(8))
    path = tmp_path / "p.safetensors"
    Profile([layer], fingerprint=fr.fingerprint(model)).save(path)
    assert Profile.load(bytes(path)).layer_names == [""]


def test_sparse_x_is_refused_clearly():
    x = torch.randn(3, 4).to_sparse()
    with pytest.raises((TypeError, ValueError), match="sparse|strided"):
        torch.ops.fire.repair(x, torch.randn(1, 4), torch.ones(1), None, None, "project")


def test_torch_jit_script_of_a_repaired_model_is_refused_clearly():
    model = nn.Sequential(nn.Linear(8, 8))
    fr.attach(model, Profile([_layer("clamp", name="0")], fingerprint=fr.fingerprint(model)))
    with pytest.raises(RuntimeError, match="TorchScript|torch.jit"):
        torch.jit.script(model)


@pytest.mark.parametrize("scores", [False, True])
def test_per_position_output_keeps_x_strides_when_x_is_copied(scores):
    x = torch.randn(2, 3, 4, 5).transpose(2, 3)  # positions not addressable with one stride: copied
    V, a = torch.randn(1, 3), torch.ones(1)
    if scores:
        out, _ = torch.ops.fire.repair_with_scores(x, V, a, None, None, "project", 1)
    else:
        out = torch.ops.fire.repair(x, V, a, None, None, "project", 1)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, fr.repair_reference(x, V, a, None, None, "project", 1)[0])


# ----------------------------------------------------------------------------- selection

def _paired_estimator():
    model = _model().eval()
    est = fr.Estimator(model, ["1"])
    g = torch.Generator().manual_seed(2)
    xc = torch.randn(40, 6, generator=g)
    est.observe(xc, poisoned=False)
    return est, xc


def test_select_refuses_an_empty_clean_reference():
    est, xc = _paired_estimator()
    with pytest.raises(ValueError, match="x_clean_reference"):
        fr.select(est, xc[:20], xc[:20] + 2.0, x_clean_reference=xc[:0], folds=2)
    with pytest.raises(ValueError, match="x_clean_reference"):
        fr.select_unpaired(est, xc[:20] + 2.0, xc[:0], folds=2)


def test_select_refuses_nan_max_clean_change():
    est, xc = _paired_estimator()
    with pytest.raises(ValueError, match="max_clean_change"):
        fr.select(est, xc[:20], xc[:20] + 2.0, max_clean_change=float("nan"), folds=2)


def test_select_names_an_unwatched_layer():
    est, xc = _paired_estimator()
    with pytest.raises(ValueError, match="does not watch"):
        fr.select(est, xc[:20], xc[:20] + 2.0, layer_sets=[["3"]], folds=2)
