"""Mode invert above the op: the estimator's profile (beta and slope from the pairs), the profile
file, the attached module, and the harness's choice of it. The op's maths is tested with the
other modes (test_op_reference.py, test_op_positions.py, test_op_autograd.py)."""
from collections import OrderedDict

import pytest
import torch
from helpers import D, identity_model

import fire_repair as fr
from fire_repair.profile import LayerProfile, Profile, ProfileError

A = 0.5  # the blend's strength: x' = (1 - A) x + A p


def blend_data(n_clean=400, n_pairs=8, a=A, seed=0):
    """Clean rows in [0, 1]; the pairs are the brightest few, blended with a bright pattern p
    (far enough from the clean rows that the clean 0.99 quantile of the score flags them all)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n_clean, D, generator=g)
    p = 2 + torch.rand(D, generator=g)
    twins = clean[clean.mean(1).argsort(descending=True)[:n_pairs]]
    return clean, twins, (1 - a) * twins + a * p, p


def fitted(paired_beta="mean", n_pairs=8):
    """An estimator that saw clean rows and pairs of a blend (identity layer)."""
    clean, twins, blended, p = blend_data(n_pairs=n_pairs, a=A)
    est = fr.Estimator(identity_model(), ["feat"], k=1, paired_beta=paired_beta)
    est.observe(clean, poisoned=False)
    est.observe_pairs(twins, blended)
    return est, clean, p


def invert_fresh_blends(layer, p, seed):
    """(fresh clean rows, them blended, `layer`'s invert repair of the blends, which it flagged)."""
    fresh = torch.rand(200, D, generator=torch.Generator().manual_seed(seed))
    blended = (1 - A) * fresh + A * p
    out, scores = torch.ops.fire.repair_with_scores(blended, layer.directions, layer.alpha, layer.center, layer.tau,
                                                    "invert", slope=layer.slope)
    return fresh, blended, out, scores[:, 0] > layer.tau[0]


@pytest.mark.parametrize("paired_beta", ["mean", "control_variate"])
def test_the_profile_undoes_a_blend_whatever_the_paired_beta(paired_beta):
    est, clean, p = fitted(paired_beta)
    layer = est.profile(mode="invert", alpha=1.0, tau_quantile=0.99).layer("feat")
    mu = est.stats["feat"].clean_mean().float()
    torch.testing.assert_close(layer.slope, torch.tensor([-A]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.directions[0], A * (p - mu), rtol=1e-4, atol=1e-6)  # the control variate's
    # unseen clean rows, blended: the flagged ones come back to their clean selves
    fresh, blended, out, flagged = invert_fresh_blends(layer, p, seed=5)
    assert flagged.float().mean() > 0.9
    torch.testing.assert_close(out[flagged], fresh[flagged], rtol=1e-4, atol=1e-5)
    gated = torch.ops.fire.repair(blended, layer.directions, layer.alpha, layer.center, layer.tau, "gated")
    assert (gated[flagged] - fresh[flagged]).abs().amax() > 0.05  # the shift alone does not


def test_slope_only_on_the_first_direction_with_k_above_one():
    est, _, _ = fitted()
    layer = est.profile(mode="invert", k=2).layer("feat")
    assert layer.slope.shape == (2,) and layer.slope[1] == 0 and layer.slope[0] == pytest.approx(-A, abs=1e-5)


def test_unpaired_invert_takes_the_slope_from_the_flagged_rows_spread():
    clean, _, _, p = blend_data(n_clean=1200)
    ref, others = clean[:600], clean[600:]
    flagged = (1 - A) * others + A * p  # other images than the clean ones, blended
    est = fr.Estimator(identity_model(), ["feat"], k=1, reservoir=1024)
    est.observe(ref, poisoned=False)
    est.observe(flagged, poisoned=True)
    layer = est.profile(mode="invert", alpha=1.0, tau_quantile=0.99).layer("feat")
    assert layer.slope[0] == pytest.approx(-A, abs=0.03)
    fresh, blended, out, flagged_now = invert_fresh_blends(layer, p, seed=7)
    assert flagged_now.float().mean() > 0.9
    gated = est.profile(mode="gated", alpha=1.0, tau_quantile=0.99).layer("feat")
    shifted = torch.ops.fire.repair(blended, gated.directions, gated.alpha, gated.center, gated.tau, "gated")
    err_invert = (out - fresh)[flagged_now].norm(dim=1).mean()
    err_gated = (shifted - fresh)[flagged_now].norm(dim=1).mean()
    assert err_invert < 0.5 * err_gated  # the spread's slope undoes most of what the shift alone leaves


def test_unpaired_slope_is_near_zero_for_a_trigger_that_only_adds():
    clean, _, _, p = blend_data(n_clean=1200)
    est = fr.Estimator(identity_model(), ["feat"], k=1, reservoir=1024)
    est.observe(clean[:600], poisoned=False)
    est.observe(clean[600:] + p, poisoned=True)
    assert est.profile(mode="invert").layer("feat").slope[0] == pytest.approx(0.0, abs=0.05)


def test_unpaired_invert_per_position_is_refused():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(feat=torch.nn.Identity()))
    est = fr.Estimator(model, ["feat"], k=1, per_position=True, channel_dim=1)
    x = torch.randn(40, 3, 4, 4, generator=g)
    est.observe(x, poisoned=False)
    trig = x.clone()
    trig[:, :, 1, 1] += 5.0
    est.observe(trig, poisoned=True)
    with pytest.raises(ValueError, match="per position needs paired samples"):
        est.profile(mode="invert")


def _layer(**change):
    kw = dict(name="feat", mode="invert", directions=torch.randn(2, D), alpha=torch.ones(2), center=torch.zeros(D),
              tau=torch.zeros(2), slope=torch.tensor([-0.2, 0.0]))
    kw.update(change)
    return LayerProfile(**kw)


@pytest.mark.parametrize("change,text", [
    (dict(slope=None), "needs slope"),
    (dict(mode="gated"), "slope is only used"),
    (dict(slope=torch.zeros(3)), "slope must have shape (2,)"),
    (dict(slope=torch.tensor([float("nan"), 0.0])), "slope has non-finite"),
    (dict(slope=torch.tensor([-0.6, -0.4])), "invert needs it above 0.05"),  # both flagged: 1 - 1.0
    (dict(slope=torch.tensor([-0.5, 0.0]), alpha=torch.tensor([1.95, 1.0])), "invert needs it above 0.05"),
], ids=["missing", "with gated", "wrong K", "NaN", "pole over two flags", "pole through alpha"])
def test_layer_profile_refuses_a_bad_slope(change, text):
    with pytest.raises(ProfileError, match=text.replace("(", r"\(").replace(")", r"\)")):
        _layer(**change)


def test_the_profile_file_keeps_the_slope_and_its_checksum_covers_it(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    est, _, _ = fitted()
    profile = est.profile(mode="invert", alpha=1.25)
    path = tmp_path / "p.safetensors"
    profile.save(path)
    back = Profile.load(path, est.model)
    assert torch.equal(back.layer("feat").slope, profile.layer("feat").slope)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.slope"] = tensors["0.slope"] * 0.5  # an edit that would change every flagged output
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ProfileError, match="checksum"):
        Profile.load(path, est.model)


def test_attached_model_applies_the_slope_and_refuses_a_bad_one():
    est, clean, p = fitted()
    profile = est.profile(mode="invert", alpha=1.0, tau_quantile=0.99)
    layer = profile.layer("feat")
    model = est.model
    x = (1 - A) * clean[:32] + A * p
    fr.attach(model, profile)
    try:
        module = fr.repair_modules(model)["feat"]
        want = torch.ops.fire.repair(x, layer.directions, layer.alpha, layer.center, layer.tau, "invert",
                                     slope=layer.slope)
        torch.testing.assert_close(module(x), want, rtol=0, atol=0)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert torch.equal(state["feat.fire_repair.slope"], layer.slope)
        state["feat.fire_repair.slope"] = torch.tensor([-1.0])  # 1 + alpha * slope = 0: a division by zero
        with pytest.raises(ValueError, match="invert needs it above 0.05"):
            model.load_state_dict(state)
        module.slope.fill_(float("inf"))  # a write past the library: check_repairs finds it
        with pytest.raises(ValueError, match="slope contains NaN or inf"):
            fr.check_repairs(model)
    finally:
        fr.detach(model)


def test_selection_offers_invert_paired_and_unpaired():
    clean, _, _, p = blend_data(a=A)
    est = fr.Estimator(identity_model(), ["feat"], k=1)
    est.observe(clean[16:], poisoned=False)
    twins = clean[:16]
    sel = fr.select(est, twins, (1 - A) * twins + A * p, x_clean_reference=clean[16:80], modes=["gated", "invert"],
                    alphas=[1.0], tau_quantile=0.99)
    assert {e["mode"] for e in sel.evidence} == {"gated", "invert"}
    assert all("error" not in e for e in sel.evidence)
    flagged = (1 - A) * clean[:16] + A * p
    unpaired = fr.Estimator(est.model, ["feat"], k=1)
    unpaired.observe(clean[16:], poisoned=False)
    sel = fr.select_unpaired(unpaired, flagged, clean[16:80], modes=["clamp", "invert"], alphas=[1.0],
                             tau_quantile=0.99)
    inverts = [e for e in sel.evidence if e["mode"] == "invert"]
    assert inverts and all("error" not in e for e in inverts)


def test_online_refuses_invert_and_the_harness_runs_it_as_gated(monkeypatch):
    est, _, _ = fitted()
    with pytest.raises(ValueError, match="Online: mode 'invert' is not served online"):
        fr.Online(est, mode="invert")
    from fire_eval import harness

    seen = {}

    class Spy(fr.Online):
        def __init__(self, estimator, mode="clamp", **kw):
            seen["mode"] = mode
            super().__init__(estimator, mode=mode, **kw)

    monkeypatch.setattr(harness.fr, "Online", Spy)
    clean, _, blended, p = blend_data()
    sel = fr.Selection(profile=None, layers=["feat"], mode="invert", alpha=1.0, tau_quantile=0.99)
    cfg = harness.RunConfig(attack="blended", match_clean=False)
    out = harness.online_curve(est.model, sel, cfg, clean[:64], (1 - A) * clean[64:80] + A * p,
                               (1 - A) * clean[80:96] + A * p, torch.zeros(16, dtype=torch.int64))
    assert seen["mode"] == "gated" and out["mode"] == "gated" and len(out["curve"]) == 3


def test_the_harness_offers_invert_two_gates_paired_and_unpaired():
    from fire_eval import harness

    cfg = harness.RunConfig(attack="blended")
    assert harness.tau_quantiles(cfg, harness.SELECTED_MODES) == {"clamp": (0.9, 0.99), "gated": (0.999,),
                                                                  "invert": (0.99, 0.999)}
    assert "invert" in harness.FIRE_DEFENSES["fire"]().modes
    assert "invert" in harness.FIRE_DEFENSES["fire-unpaired"]().modes
    assert harness.FIRE_DEFENSES["fire-invert"]().modes == ("invert",)
