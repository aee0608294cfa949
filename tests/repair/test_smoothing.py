"""Gated input smoothing (`fire_repair.Smoothing`): its settings, the blur and the flagged
pixels against plain references, attach / detach / save / load with a profile that carries it,
and fr.fit's label-free offer of it on the moving patch."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import fire_repair as fr
from fire_repair.smoothing import flagged_pixels, gaussian_blur, position_scores, smooth


def test_settings_are_checked_and_round_trip():
    s = fr.Smoothing(layer="block1", gate=3.5, quantile=0.9999)
    assert fr.Smoothing.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in (dict(gate=float("nan")), dict(quantile=1.0), dict(sigma=0.0), dict(size=4), dict(dilate=-1),
                dict(layer=""), dict(size=True), dict(size=33), dict(dilate=32), dict(gate=10 ** 400)):
        with pytest.raises(ValueError, match="Smoothing"):
            fr.Smoothing(**{"layer": "block1", "gate": 1.0, "quantile": 0.9, **bad})
    with pytest.raises(ValueError, match="smoothing must be"):
        fr.Smoothing.from_dict({"layer": "block1", "gate": 1.0})


@pytest.mark.parametrize("size,sigma", [(3, 0.8), (5, 1.0)])
def test_gaussian_blur_against_a_direct_sum(size, sigma):
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    out = gaussian_blur(x, sigma, size)
    r = torch.arange(size, dtype=torch.float64) - size // 2
    w = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    pad = F.pad(x, [size // 2] * 4, mode="reflect")
    ref = torch.zeros_like(x)
    for i in range(size):
        for j in range(size):
            ref += w[i, j] * pad[..., i:i + 9, j:j + 11]
    torch.testing.assert_close(out, ref)
    const = torch.full((1, 3, 2, 2), 0.3)  # smaller than the window: replicate padding, a constant stays
    torch.testing.assert_close(gaussian_blur(const, sigma, size), const)


def test_flagged_pixels_are_the_footprint_dilated():
    scores = torch.zeros(1, 4, 4)
    scores[0, 1, 2] = 5.0
    mask = flagged_pixels(scores, 1.0, (8, 8), dilate=0)[0, 0]
    ref = torch.zeros(8, 8, dtype=torch.bool)
    ref[2:4, 4:6] = True
    assert torch.equal(mask, ref)
    grown = flagged_pixels(scores, 1.0, (8, 8), dilate=1)[0, 0]
    ref[1:5, 3:7] = True
    assert torch.equal(grown, ref)
    assert not flagged_pixels(scores, 5.0, (8, 8), dilate=1).any()  # strictly above the gate
    with pytest.raises(ValueError, match="two position dims"):
        flagged_pixels(torch.zeros(1, 16), 1.0, (8, 8), dilate=0)


def _per_position_profile(b, layer="block1"):
    model = b["model"]
    est = fr.Estimator(model, [layer], per_position=True, channel_dim=1)
    est.observe(b["hold_clean"], poisoned=False)
    est.observe_pairs(*(t[:16] for t in b["hold_pairs"]))
    return est.profile(mode="clamp", alpha=1.0, tau_quantile=0.9, with_fingerprint=True)


@pytest.mark.slow
def test_attached_smoothing_is_repair_on_the_smoothed_input(backdoored_moving, tmp_path):
    b = backdoored_moving
    model, x = b["model"], b["eval_poison"][:32]
    profile = _per_position_profile(b)
    s = fr.smoothing.calibrate(model, profile, "block1", b["hold_clean"], 0.999)
    with fr.attached(model, profile), torch.no_grad():
        plain = model(x)
        with fr.capture(model) as cap:
            model(x)
        expected_input = smooth(x, (cap.projections["block1"] / cap.modules["block1"].score_scale).amax(-1), s)
        torch.testing.assert_close(position_scores(cap.modules["block1"], cap.inputs["block1"]),
                                   (cap.projections["block1"] / cap.modules["block1"].score_scale).amax(-1))
        expected = model(expected_input)
    assert not torch.equal(expected_input, x)  # the trigger was flagged and blurred
    profile.smoothing = s
    with fr.attached(model, profile), torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with torch.no_grad():  # detached: no hook left behind
        assert not model._forward_pre_hooks
        fr.attach(model, fr.Profile(layers=profile.layers, fingerprint=profile.fingerprint))
        torch.testing.assert_close(model(x), plain)
        fr.detach(model)
    # saved and loaded with the profile, under its checksum
    path = tmp_path / "p.safetensors"
    profile.save(path)
    assert fr.Profile.load(path, model).smoothing == s
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["smoothing"] = json.dumps({**s.to_dict(), "gate": s.gate + 1})
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(fr.ProfileError, match="checksum"):
        fr.Profile.load(tmp_path / "edited.safetensors", model)


def test_a_profile_refuses_smoothing_at_a_layer_it_cannot_read(backdoored):
    b = backdoored
    est = fr.Estimator(b["model"], ["block2"], k=1)
    est.observe(b["hold_clean"][:64], poisoned=False)
    est.observe_pairs(*(t[:8] for t in b["hold_pairs"]))
    flat = est.profile(mode="clamp", alpha=1.0)
    with pytest.raises(fr.ProfileError, match="per-position"):
        fr.Profile(layers=flat.layers, smoothing=fr.Smoothing(layer="block2", gate=1.0, quantile=0.9))
    with pytest.raises(fr.ProfileError, match="not a layer"):
        fr.Profile(layers=flat.layers, smoothing=fr.Smoothing(layer="block1", gate=1.0, quantile=0.9))
    with pytest.raises(ValueError, match="per-position"):
        fr.smoothing.calibrate(b["model"], flat, "block2", b["hold_clean"][:8], 0.9)


@pytest.mark.slow
def test_fit_offers_smoothing_and_keeps_it_by_the_recorded_evidence(backdoored_moving):
    b = backdoored_moving
    model = b["model"]
    pairs = tuple(t[:16] for t in b["hold_pairs"])
    res = fr.fit(model, b["hold_clean"], pairs=pairs, forms=("per_position",), modes=("clamp",), alphas=(1.0,))
    info = res.profile.info["smoothing"]
    assert info["offered"] and info["quantile"] == 0.9999
    first, rest = info["candidates"][0], info["candidates"][1:]
    assert first["smoothing_layer"] is None
    # every per-position layer set of the grid, each tau and alpha, smoothed at each layer of the set
    sets = {tuple(e["layers"]) for e in res.selection.evidence}
    assert {(tuple(c["layers"]), c["tau_quantile"], c["alpha"], c["smoothing_layer"]) for c in rest} == \
        {(s, q, 1.0, layer) for s in sets for q in (0.9, 0.99) for layer in s}
    won = res.choice["smoothing"]
    winner = next(c for c in info["candidates"] if (c["layers"], c["tau_quantile"], c["alpha"], c["smoothing_layer"]) ==
                  (res.choice["layers"], res.choice["tau_quantile"], res.choice["alpha"], won and won["layer"]))
    assert info["chosen"] == (winner is not first) == (res.profile.smoothing is not None)
    assert winner["expected_drop"] <= 0.01
    # choose's rule: the best agreement within one sample, then the smaller twin_kl
    best = max(round(16 * c["agreement"]) for c in info["candidates"]
               if c.get("expected_drop") is not None and c["expected_drop"] <= 0.01)
    assert round(16 * winner["agreement"]) >= best - 1
    assert all(winner["twin_kl"] <= c["twin_kl"] for c in info["candidates"]
               if round(16 * c["agreement"]) >= best - 1 and c.get("expected_drop") is not None
               and c["expected_drop"] <= 0.01)
    if won:
        assert won == {"layer": res.profile.smoothing.layer, "quantile": 0.9999}
        assert {"layer": won["layer"], "gate": res.profile.smoothing.gate} in info["gates"]
    off = fr.fit(model, b["hold_clean"], pairs=pairs, forms=("per_position",), modes=("clamp",), alphas=(1.0,),
                 smoothing=False)
    assert off.profile.smoothing is None and "smoothing" not in off.profile.info
    # a flattened choice is not offered smoothing
    flat = fr.fit(model, b["hold_clean"], pairs=pairs, forms=("flattened",), modes=("clamp",), alphas=(1.0,),
                  layers=["block2"], layer_pairs=False)
    assert flat.profile.smoothing is None and "smoothing" not in flat.profile.info


@pytest.mark.slow
def test_exported_package_smooths_like_eager(backdoored_moving, tmp_path):
    """fr.export traces the smoothing as one forward: the package matches the eager attached
    model on triggered images (where the smoothing acts) at two batch sizes."""
    b = backdoored_moving
    model, x = b["model"], b["eval_poison"][:9]
    profile = _per_position_profile(b)
    profile.smoothing = fr.smoothing.calibrate(model, profile, "block1", b["hold_clean"], 0.999)
    with fr.attached(model, profile), torch.no_grad():
        expected = model(x)
        path = fr.export(model, x, tmp_path / "m.pt2")
        assert model._forward_pre_hooks  # export left the attached model as it was
        torch.testing.assert_close(model(x), expected)
    with fr.attached(model, fr.Profile(layers=profile.layers, fingerprint=profile.fingerprint)), torch.no_grad():
        unsmoothed = model(x)
    assert not torch.allclose(unsmoothed, expected, atol=1e-3)  # the smoothing changes these outputs
    package = torch._inductor.aoti_load_package(str(path))
    for n in (1, 9):
        torch.testing.assert_close(package(x[:n]), expected[:n], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smoothing_under_compile_hooks_grad_and_its_file_version(backdoored_moving, tmp_path):
    """A compiled attached model runs every call (the scores' hook is not re-registered per
    call); a pre-hook the user put on the model runs once per pass, never on top of itself; the inner
    pass builds no graph; calibration ignores a smoothing the profile already has; a profile
    with smoothing is file version 3 (an older reader refuses it), one without stays 2; a
    smoothing set after construction at a flattened layer is refused by attach and save."""
    b = backdoored_moving
    model, x = b["model"], b["eval_poison"][:8]
    profile = _per_position_profile(b)
    s = fr.smoothing.calibrate(model, profile, "block1", b["hold_clean"], 0.999)
    profile.smoothing = s
    assert fr.smoothing.calibrate(model, profile, "block1", b["hold_clean"], 0.999) == s
    with fr.attached(model, profile):
        with torch.no_grad():
            expected = model(x)
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(compiled(x), expected)
        seen = []
        handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        # once per pass: the inner pass (the scores) on the images, the model's on the smoothed ones
        assert len(seen) == 2 and torch.equal(seen[0], x) and not torch.equal(seen[1], x)
        out = model(x.requires_grad_(True))
        out.sum().backward()  # the outer pass carries the graph; the inner one none
        assert x.grad is not None
    for smoothing, version in ((s, "3"), (None, "2")):
        profile.smoothing = smoothing
        profile.save(tmp_path / "p.safetensors")
        with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
            assert f.metadata()["version"] == version
    est = fr.Estimator(model, ["block2"], k=1)
    est.observe(b["hold_clean"][:64], poisoned=False)
    est.observe_pairs(*(t[:8] for t in b["hold_pairs"]))
    flat = est.profile(mode="clamp", alpha=1.0)
    flat.smoothing = fr.Smoothing(layer="block2", gate=1.0, quantile=0.9)
    with pytest.raises(fr.ProfileError, match="per-position"):
        fr.attach(model, flat, check_fingerprint=False)
    assert not fr.repair_modules(model) and not model._forward_pre_hooks
    with pytest.raises(fr.ProfileError, match="per-position"):
        flat.save(tmp_path / "q.safetensors")
