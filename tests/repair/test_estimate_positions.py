"""Per-position FIRE: estimation of (K, C) directions from triggers that land anywhere, the
profile's form, attach, online and selection between the two forms."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fire_repair as fr
from fire_repair.stats import PositionStats

C, H, W = 8, 6, 6


class Identity(nn.Module):
    def forward(self, x):
        return x


def map_model():
    """'feat' outputs its (N, C, H, W) input, so planted per-position shifts are known exactly."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(feat=Identity(), flat=nn.Flatten(), head=nn.Linear(C * H * W, 3)))


def moving(n=64, seed=0, strength=4.0, u=None):
    """Clean maps and their twins with `strength * u` added at one random position each (and,
    weaker, at a neighbour: a trigger wider than one position)."""
    g = torch.Generator().manual_seed(seed)
    if u is None:
        u = nn.functional.normalize(torch.randn(C, generator=g), dim=0)
    clean = torch.randn(n, C, H, W, generator=g)
    poisoned = clean.clone()
    for i in range(n):
        h, w = torch.randint(0, H - 1, (2,), generator=g).tolist()
        poisoned[i, :, h, w] += strength * u
        poisoned[i, :, h + 1, w] += 0.6 * strength * u
    return clean, poisoned, u


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_paired_direction_is_found_wherever_the_trigger_lands():
    clean, poisoned, u = moving()
    est = fr.Estimator(map_model(), ["feat"], per_position=True)
    est.observe_pairs(clean, poisoned)
    prof = est.profile(mode="clamp")
    layer = prof.layer("feat")
    assert layer.channel_dim == 1 and layer.directions.shape == (1, C) and layer.center.shape == (C,)
    assert cos(layer.directions[0], u) > 0.999
    # untouched positions are not averaged in: beta keeps the trigger's strength (4 and 2.4)
    assert float(layer.beta.norm()) > 2.0
    # the flattened form cannot describe a moving trigger: its direction spreads over positions
    flat = fr.Estimator(map_model(), ["feat"])
    flat.observe_pairs(clean, poisoned)
    v = flat.profile(mode="clamp").layer("feat").directions[0].reshape(C, H, W)
    assert max(abs(cos(v[:, h, w], u)) * float(v[:, h, w].norm()) for h in range(H) for w in range(W)) < 0.5


def test_unpaired_direction_from_positions_that_stand_out():
    clean, poisoned, u = moving(n=128, seed=1)
    est = fr.Estimator(map_model(), ["feat"], per_position=True)
    est.observe(clean[:64], poisoned=False)
    est.observe(poisoned[64:], poisoned=True)
    layer = est.profile(mode="clamp", source="unpaired").layer("feat")
    assert cos(layer.directions[0], u) > 0.98
    # a diluted mean over all 36 positions would be under 0.2 of the trigger's strength
    assert float(layer.beta.norm()) > 1.5


def test_k2_per_position_spans_two_trigger_directions():
    g = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(C, 2, generator=g))
    clean, poisoned, _ = moving(n=96, seed=2, u=basis[:, 0])
    extra = torch.randn(96, generator=g) * 2.0
    diff = (poisoned - clean).norm(dim=1, keepdim=True) > 0  # where the trigger landed
    poisoned = poisoned + diff * extra[:, None, None, None] * basis[:, 1][None, :, None, None]
    est = fr.Estimator(map_model(), ["feat"], k=2, per_position=True)
    est.observe_pairs(clean, poisoned)
    V = est.profile(mode="project").layer("feat").directions
    torch.testing.assert_close(V @ V.T, torch.eye(2), atol=1e-5, rtol=0)
    proj = basis.T @ V.T  # (2, 2): both rows inside the planted span
    assert float(proj.pow(2).sum(0).min()) > 0.95


def test_clamp_profile_repairs_the_moved_trigger_and_leaves_clean_maps():
    clean, poisoned, u = moving(n=64, strength=8.0)
    model = map_model()
    est = fr.Estimator(model, ["feat"], per_position=True)
    est.observe_pairs(clean[:32], poisoned[:32])
    prof = est.profile(mode="clamp", alpha=1.0, tau_quantile=0.999)
    layer = prof.layer("feat")
    v, mu, tau = layer.directions[0], layer.center, float(layer.tau[0])

    def peak(h):  # the largest per-position projection of each map
        return torch.einsum("nchw,c->nhw", h - mu[None, :, None, None], v).flatten(1).amax(1)

    fr.attach(model, prof)
    try:
        out_p, out_c = model.feat(poisoned[32:]), model.feat(clean[32:])
    finally:
        fr.detach(model)
    assert bool((peak(poisoned[32:]) > tau + 3).all())  # every trigger stands out before
    assert bool((peak(out_p) <= tau + 1e-4).all())  # and is back within the clean range after
    # clean maps: only the 0.1% of positions beyond tau move, and only by their excess
    assert float((out_c - clean[32:]).norm()) < 0.02 * float(clean[32:].norm())


def test_tokens_channel_dim_minus_one():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (N, T, C)

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(tok=Tokens(), flat=nn.Flatten(), head=nn.Linear(C * H * W, 3)))
    clean, poisoned, u = moving()
    est = fr.Estimator(model, ["tok"], per_position=True, channel_dim=-1)
    est.observe_pairs(clean, poisoned)
    prof = est.profile(mode="clamp")
    assert prof.layer("tok").channel_dim == -1 and cos(prof.layer("tok").directions[0], u) > 0.999
    fr.attach(model, prof)
    try:
        with fr.capture(model) as cap:
            model(poisoned[:4])
        assert cap.projections["tok"].shape == (4, H * W, 1)
        assert cap.score("tok").shape == (4,)
    finally:
        fr.detach(model)


def test_positions_may_change_between_batches_but_channels_may_not():
    est = fr.Estimator(map_model(), ["feat"], per_position=True)
    model_input = torch.randn(4, C, H, W)
    est.observe(model_input, poisoned=False)
    rows = est.rows(torch.randn(2, C, 3, 5))
    assert rows.shape == (2, 15, C)
    with pytest.raises(ValueError, match="channel_dim=3 is not a feature dim"):
        fr.Estimator(map_model(), ["feat"], per_position=True, channel_dim=3).rows(torch.randn(2, C))
    with pytest.raises(ValueError, match="channel_dim must be a non-zero int"):
        fr.Estimator(map_model(), ["feat"], per_position=True, channel_dim=0)
    with pytest.raises(ValueError, match="touched must be in"):
        fr.Estimator(map_model(), ["feat"], per_position=True, touched=0.0)


def test_profile_round_trip_keeps_the_form(tmp_path):
    clean, poisoned, _ = moving()
    model = map_model()
    est = fr.Estimator(model, ["feat"], per_position=True)
    est.observe_pairs(clean, poisoned)
    prof = est.profile(mode="clamp")
    prof.save(tmp_path / "p.safetensors")
    back = fr.Profile.load(tmp_path / "p.safetensors", model)
    assert back.layer("feat").channel_dim == 1 and back.layer("feat").form == "per_position"
    torch.testing.assert_close(back.layer("feat").directions, prof.layer("feat").directions)


def test_version_1_profiles_still_load_as_flattened(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from fire_repair.profile import _digest

    model = map_model()
    est = fr.Estimator(model, ["feat"])
    clean, poisoned, _ = moving(n=16)
    est.observe_pairs(clean, poisoned)
    est.profile(mode="clamp").save(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    for spec in layers:
        del spec["channel_dim"]
    meta.update(version="1", layers=json.dumps(layers))
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    old = fr.Profile.load(tmp_path / "v1.safetensors", model)
    assert old.layer("feat").channel_dim is None
    # a version-2 file must say which form it holds
    meta.update(version="2")
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(tmp_path / "v2-bad.safetensors"), metadata=meta)
    with pytest.raises(fr.ProfileError, match="channel_dim"):
        fr.Profile.load(tmp_path / "v2-bad.safetensors", model)


def test_layer_repair_rejects_a_bad_channel_dim():
    with pytest.raises(fr.ProfileError, match="channel_dim must be None or a non-zero int"):
        fr.LayerProfile(name="x", mode="project", directions=torch.randn(1, C), alpha=torch.ones(1),
                       center=torch.zeros(C), channel_dim=0)
    with pytest.raises(fr.ProfileError, match="per-position directions must be"):
        fr.LayerProfile(name="x", mode="project", directions=torch.randn(1, C, 2), alpha=torch.ones(1),
                       center=torch.zeros(C, 2), channel_dim=1)


def test_state_dict_merge_and_clone_keep_the_form():
    clean, poisoned, _ = moving()
    a = fr.Estimator(map_model(), ["feat"], per_position=True, touched=0.3)
    a.observe_pairs(clean[:32], poisoned[:32])
    b = a.clone()
    assert b.per_position and b.touched == 0.3 and isinstance(b.stats["feat"], PositionStats)
    b.observe_pairs(clean[32:], poisoned[32:])
    restored = fr.Estimator(map_model(), ["feat"], per_position=True).load_state_dict(b.state_dict())
    assert isinstance(restored.stats["feat"], PositionStats) and restored.stats["feat"].touched == 0.3
    torch.testing.assert_close(restored.profile(mode="clamp").layer("feat").directions,
                               b.profile(mode="clamp").layer("feat").directions)
    flat = fr.Estimator(map_model(), ["feat"])
    flat.observe(clean[:4], poisoned=False)
    with pytest.raises(ValueError, match="cannot merge"):
        flat.merge(a)


def test_online_refines_per_position_directions():
    clean, poisoned, u = moving(n=96, seed=3)
    model = map_model()
    est = fr.Estimator(model, ["feat"], per_position=True)
    est.observe(clean[:48], poisoned=False)
    online = fr.Online(est, mode="clamp", threshold=None)
    try:
        for i in range(48, 96, 16):
            online.step(poisoned[i:i + 16], poisoned=torch.ones(16, dtype=torch.bool))
        assert online.profile.layer("feat").channel_dim == 1
        assert cos(online.profile.layer("feat").directions[0], u) > 0.98
    finally:
        online.close()


def test_select_chooses_between_forms(backdoored_moving):
    """On a model backdoored with a moving patch, selection over both forms reports each form's
    evidence and picks by the label-free criterion."""
    b = backdoored_moving
    model = b["model"]
    flat = fr.Estimator(model, ["block2"])
    pos = fr.Estimator(model, ["block2"], per_position=True)
    for est in (flat, pos):
        est.observe(b["hold_clean"], poisoned=False)
    sel = fr.select([flat, pos], *b["hold_pairs"], alphas=(1.0,), x_clean_reference=b["hold_clean"])
    forms = {e["form"] for e in sel.evidence}
    assert forms == {"flattened", "per_position"}
    best = max(sel.evidence, key=lambda e: e["agreement"])
    assert sel.form == best["form"] and sel.profile.layer("block2").form == sel.form
    assert "per_position" in sel.table()
    with pytest.raises(ValueError, match="two estimators of the same form"):
        fr.select([pos, pos], *b["hold_pairs"], alphas=(1.0,))
