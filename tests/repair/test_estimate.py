"""Estimator: directions, streaming, bounded memory, merging, calibration, errors."""
import os
from collections import OrderedDict

import pytest
import torch
from helpers import D, identity_model, planted  # noqa: E402
from torch import nn

import fire_repair as fr


def test_paired_direction_is_the_mean_difference():
    model = identity_model()
    clean, poisoned, u = planted()
    est = fr.Estimator(model, ["feat"], k=1)
    est.observe_pairs(clean, poisoned)
    layer = est.profile(mode="project").layer("feat")
    torch.testing.assert_close(layer.directions[0], u[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.beta, 3.0 * u[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.center, clean.mean(0), rtol=1e-5, atol=1e-5)
    shift = est.profile(mode="shift").layer("feat")
    torch.testing.assert_close(shift.directions[0], 3.0 * u[0], rtol=1e-4, atol=1e-5)


def test_unpaired_direction_is_the_difference_of_means():
    model = identity_model()
    clean, poisoned, _ = planted()
    other_clean, _, _ = planted(seed=1)
    est = fr.Estimator(model, ["feat"], k=1)
    est.observe(other_clean, poisoned=False)
    est.observe(poisoned, poisoned=True)
    beta = (poisoned.mean(0) - other_clean.mean(0)).double()
    # shrunk along the clean principal directions by the sampling noise of a difference of means
    lam, U = torch.linalg.eigh(torch.cov(other_clean.double().T))
    coef = U.T @ beta
    share = (1 - lam * (1 / len(poisoned) + 1 / len(other_clean)) / coef ** 2).clamp_min(0)
    expected = (beta - U @ ((1 - share) * coef)).float()
    layer = est.profile(mode="project").layer("feat")
    torch.testing.assert_close(layer.directions[0], expected / expected.norm(), rtol=1e-4, atol=1e-4)
    assert est.profile().info["layers"]["feat"]["source"] == "unpaired"


def test_unpaired_shrinkage_removes_the_content_difference_of_few_samples():
    """Few poisoned images against many clean ones, where the clean data varies strongly along a
    few directions (as images do in brightness and layout): the raw difference of means points
    partly along that variation; the shrunk one is closer to the trigger's direction on every
    one of 20 draws (measured: mean cosine 0.52 raw, 0.77 shrunk)."""
    raw_cos, shrunk_cos = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(D, 4, generator=g))
        trigger, content = u[:, 0], u[:, 1:]  # orthonormal
        clean = torch.randn(2000, D, generator=g) * 0.3 + (torch.randn(2000, 3, generator=g) * 6.0) @ content.T
        others = torch.randn(16, D, generator=g) * 0.3 + (torch.randn(16, 3, generator=g) * 6.0) @ content.T
        poisoned = others + 1.5 * trigger
        est = fr.Estimator(identity_model(), ["feat"], k=1)
        est.observe(clean, poisoned=False)
        est.observe(poisoned, poisoned=True)
        raw = poisoned.mean(0) - clean.mean(0)
        raw_cos.append(float(raw @ trigger / raw.norm()))
        shrunk_cos.append(float(est.profile(mode="project").layer("feat").directions[0] @ trigger))
    assert all(s > r for s, r in zip(shrunk_cos, raw_cos, strict=True))
    assert sum(shrunk_cos) / 20 > sum(raw_cos) / 20 + 0.15


def test_mask_observation_splits_rows():
    model = identity_model()
    clean, poisoned, _ = planted(n=10)
    x = torch.cat([clean, poisoned])
    mask = torch.tensor([False] * 10 + [True] * 10)
    est = fr.Estimator(model, ["feat"])
    est.observe(x, poisoned=mask)
    assert est.stats["feat"].n_clean == 10 and est.stats["feat"].n_poison == 10


@pytest.mark.parametrize("source", ["paired", "unpaired"])
def test_k_directions_span_the_planted_subspace(source):
    model = identity_model()
    # unpaired, the trigger's spread must stand out of the clean spread's sampling noise: more samples
    clean, poisoned, u = planted(n=400 if source == "paired" else 4000, k=3)
    # paired differences have rank 3: a 16-row sketch is exact. Unpaired, the clean spread fills all
    # D dimensions, so the sketch must hold them (FD's error is ||A||_F^2 / rows otherwise).
    est = fr.Estimator(model, ["feat"], k=3, sketch_rows=16 if source == "paired" else D)
    if source == "paired":
        est.observe_pairs(clean, poisoned)
    else:
        est.observe(clean, poisoned=False)
        est.observe(poisoned, poisoned=True)
    V = est.profile(mode="project", source=source).layer("feat").directions
    torch.testing.assert_close(V @ V.T, torch.eye(3), rtol=0, atol=1e-5)  # orthonormal
    # every planted direction lies in the estimated span (within sampling noise)
    residual = u - (u @ V.T) @ V
    assert residual.norm(dim=1).max() < 0.15, residual.norm(dim=1)


def test_streaming_equals_batch_and_memory_is_bounded():
    model = identity_model()
    clean, poisoned, _ = planted(n=300, k=3)
    whole = fr.Estimator(model, ["feat"], k=2, sketch_rows=8, reservoir=64)
    whole.observe_pairs(clean, poisoned)
    stream = fr.Estimator(model, ["feat"], k=2, sketch_rows=8, reservoir=64)
    for i in range(0, 300, 7):
        stream.observe_pairs(clean[i:i + 7], poisoned[i:i + 7])
    a, b = whole.profile(mode="project").layer("feat"), stream.profile(mode="project").layer("feat")
    torch.testing.assert_close(a.directions[0], b.directions[0], rtol=1e-5, atol=1e-5)
    assert (a.directions[1] @ b.directions[1]).abs() > 0.95
    st = stream.stats["feat"]
    assert st.diff_sketch.buffer.shape == (16, D) and st.clean_sample.rows.shape == (64, D)
    stream.observe_pairs(clean.repeat(10, 1), poisoned.repeat(10, 1))
    assert st.diff_sketch.buffer.shape == (16, D) and st.clean_sample.rows.shape == (64, D)


def test_merge_equals_one_estimator_on_all_data():
    model = identity_model()
    clean, poisoned, _ = planted(n=100, k=3)
    one = fr.Estimator(model, ["feat"], k=2)
    one.observe_pairs(clean, poisoned)
    left, right = fr.Estimator(model, ["feat"], k=2), fr.Estimator(model, ["feat"], k=2)
    left.observe_pairs(clean[:50], poisoned[:50])
    right.observe_pairs(clean[50:], poisoned[50:])
    merged = left.merge(right)
    a, b = one.profile(mode="clamp"), merged.profile(mode="clamp")
    for key in ("directions", "center", "tau", "beta"):
        torch.testing.assert_close(getattr(a.layer("feat"), key), getattr(b.layer("feat"), key), rtol=1e-4, atol=1e-4)


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = identity_model()
        clean, poisoned, _ = planted(n=100, k=3)
        est = fr.Estimator(model, ["feat"], k=2)
        part = slice(rank * 50, (rank + 1) * 50)
        est.observe_pairs(clean[part], poisoned[part])
        est.all_reduce()
        est.profile(mode="clamp").save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_reach_the_single_process_profile(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model = identity_model()
    clean, poisoned, _ = planted(n=100, k=3)
    one = fr.Estimator(model, ["feat"], k=2)
    one.observe_pairs(clean, poisoned)
    expected = one.profile(mode="clamp").layer("feat")
    for rank in range(2):
        got = fr.Profile.load(tmp_path / f"rank{rank}.safetensors", model).layer("feat")
        for key in ("directions", "center", "tau", "beta", "alpha"):
            torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=1e-4, atol=1e-4)


def test_conv_layer_keeps_its_feature_shape():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), pool=nn.AdaptiveAvgPool2d(1)))
    x = torch.rand(16, 3, 8, 8)
    xp = x.clone()
    xp[..., -2:, -2:] = 1.0
    est = fr.Estimator(model, ["conv"])
    est.observe_pairs(x, xp)
    layer = est.profile(mode="clamp").layer("conv")
    assert layer.directions.shape == (1, 4, 8, 8) and layer.center.shape == (4, 8, 8)


def test_tau_is_the_requested_clean_quantile():
    model = identity_model()
    clean, poisoned, _ = planted(n=400)
    est = fr.Estimator(model, ["feat"], reservoir=1000)
    est.observe_pairs(clean, poisoned)
    for q in (0.5, 0.9, 0.99):
        layer = est.profile(mode="clamp", tau_quantile=q).layer("feat")
        proj = (clean - layer.center) @ layer.directions[0]
        assert abs((proj <= layer.tau[0]).float().mean().item() - q) < 0.01


def test_gated_profile_shifts_the_flagged_samples_by_beta_and_leaves_the_rest():
    model = identity_model()
    clean, poisoned, u = planted(n=400)
    poisoned = clean + 2 * (poisoned - clean)  # 6 clean stds along u[0]: nearly all above the 0.99 quantile
    est = fr.Estimator(model, ["feat"], reservoir=1000)
    est.observe_pairs(clean, poisoned)
    layer = est.profile(mode="gated", alpha=1.0, tau_quantile=0.99).layer("feat")
    torch.testing.assert_close(layer.directions[0], layer.beta, rtol=1e-4, atol=1e-5)  # b = beta along v
    scores = (clean - layer.center) @ layer.directions[0]
    assert abs((scores <= layer.tau[0]).float().mean().item() - 0.99) < 0.01  # tau in the rows' own units
    torch.testing.assert_close(layer.score_scale[0], scores.std(), rtol=1e-3, atol=1e-6)
    fr.attach(model, fr.Profile(layers=[layer]))
    with torch.no_grad():
        out_p, out_c = model.feat(poisoned), model.feat(clean)
    fr.detach(model)
    flagged = ((poisoned - layer.center) @ layer.directions[0]) > layer.tau[0]
    assert flagged.float().mean() > 0.99
    torch.testing.assert_close(out_p[flagged], poisoned[flagged] - layer.beta, rtol=1e-5, atol=1e-5)
    assert (out_c != clean).any(1).float().mean() <= 0.02  # only the clean samples above the 0.99 quantile move


def test_augmentations_are_averaged_in():
    model = identity_model()
    calls = []

    def augment(x):
        calls.append(x.shape[0])
        return x + 0.01 * torch.randn_like(x)

    est = fr.Estimator(model, ["feat"], augment=augment, n_augment=3)
    clean, poisoned, _ = planted(n=20)
    est.observe(clean, poisoned=False)
    est.observe(poisoned, poisoned=True)
    assert calls == [20] * 6
    assert est.stats["feat"].n_clean == 60 and est.stats["feat"].n_poison == 60


def test_progress_bar_on_loaders(capsys):
    model = identity_model()
    clean, poisoned, _ = planted(n=40)
    est = fr.Estimator(model, ["feat"])
    est.observe_loader([(clean[i:i + 10], poisoned[i:i + 10]) for i in range(0, 40, 10)], paired=True,
                       progress=True, desc="pairs")
    assert "pairs" in capsys.readouterr().err
    assert est.stats["feat"].n_pairs == 40


@pytest.mark.parametrize("bad", [
    dict(layers=["nope"]), dict(layers=[]), dict(k=0), dict(k=65), dict(k=4, sketch_rows=2), dict(n_augment=0),
])
def test_bad_estimator_arguments(bad):
    kwargs = dict(layers=["feat"], **{k: v for k, v in bad.items() if k != "layers"})
    if "layers" in bad:
        kwargs["layers"] = bad["layers"]
    with pytest.raises(ValueError):
        fr.Estimator(identity_model(), **kwargs)


def test_profile_needs_poisoned_data_and_valid_alpha():
    est = fr.Estimator(identity_model(), ["feat"], k=1)
    clean, poisoned, _ = planted(n=20)
    est.observe(clean, poisoned=False)
    with pytest.raises(ValueError, match="poisoned"):
        est.profile()
    est.observe(poisoned, poisoned=True)
    with pytest.raises(ValueError, match="alpha"):
        est.profile(alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="mode"):
        est.profile(mode="nope")
    with pytest.raises(ValueError, match="paired"):
        est.profile(source="paired")


def test_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = identity_model()
    clean, poisoned, _ = planted(n=100, k=3)
    est = fr.Estimator(model, ["feat"], k=2, sketch_rows=8, reservoir=32)
    est.observe_pairs(clean, poisoned)
    save_file(est.state_dict(), str(tmp_path / "est.safetensors"))
    back = fr.Estimator(model, ["feat"], k=2, sketch_rows=8, reservoir=32)
    back.load_state_dict(load_file(str(tmp_path / "est.safetensors")))
    a, b = est.profile(mode="clamp").layer("feat"), back.profile(mode="clamp").layer("feat")
    for key in ("directions", "center", "tau", "beta", "score_scale"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    with pytest.raises(ValueError, match="does not watch"):
        fr.Estimator(model, ["head"]).load_state_dict(est.state_dict())


def test_merge_copies_and_clone_is_independent():
    model = identity_model()
    clean, poisoned, _ = planted(n=60)
    left, right = fr.Estimator(model, ["feat"]), fr.Estimator(model, ["feat"])
    right.observe_pairs(clean, poisoned)
    left.merge(right)
    before = left.profile(mode="project").layer("feat").directions.clone()
    right.observe_pairs(poisoned, clean)  # would flip the direction if the statistics were shared
    assert torch.equal(left.profile(mode="project").layer("feat").directions, before)
    twin = left.clone()
    twin.observe(clean, poisoned=False)
    assert left.stats["feat"].n_clean == 60 and twin.stats["feat"].n_clean == 120


def test_second_direction_points_to_the_poisoned_side():
    """v2 is orthogonal to beta, so its sign cannot come from the mean difference; clamp is
    one-sided, so it must point where the poisoned rows leave the clean range."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, 2, generator=g))
    u0, u1 = basis.T
    clean = torch.randn(400, D, generator=g)
    # half of the poisoned rows jump far along +u1 (the 'piece' of the trigger), the others
    # slightly along -u1, so that the mean along u1 is zero and only the excess shows the side
    side = torch.cat([torch.full((50,), 6.0), torch.full((150,), -2.0)])
    for sign in (1.0, -1.0):  # both orientations of the data: the estimate must follow
        poisoned = clean[:200] + 4.0 * u0 + sign * side[:, None] * u1
        est = fr.Estimator(identity_model(), ["feat"], k=2)
        est.observe(clean[200:], poisoned=False)
        est.observe_pairs(clean[:200], poisoned)
        V = est.profile(mode="clamp", k=2).layer("feat").directions
        assert float(V[0] @ u0) > 0.99
        assert sign * float(V[1] @ u1) > 0.9, (sign, float(V[1] @ u1))


@pytest.mark.parametrize("mask", [[False] * 6 + [True] * 4, "numpy", "int tensor"])
def test_observe_accepts_masks_as_users_write_them(mask):
    import numpy as np

    clean, poisoned, _ = planted(n=10)
    x = torch.cat([clean[:6], poisoned[6:]])
    flags = [False] * 6 + [True] * 4
    if mask == "numpy":
        mask = np.array(flags)
    elif mask == "int tensor":
        mask = torch.tensor(flags).int()
    est = fr.Estimator(identity_model(), ["feat"])
    est.observe(x, poisoned=mask)
    assert est.stats["feat"].n_clean == 6 and est.stats["feat"].n_poison == 4


@pytest.mark.parametrize("mask, error", [([True] * 3, "one flag per sample"), (torch.rand(10), "booleans"),
                                         ([2] * 10, "booleans"), (object(), "bool or a per-sample mask")])
def test_observe_refuses_bad_masks(mask, error):
    clean, _, _ = planted(n=10)
    est = fr.Estimator(identity_model(), ["feat"])
    with pytest.raises((ValueError, TypeError), match=error):
        est.observe(clean, poisoned=mask)


def test_non_finite_activations_are_refused_and_nothing_recorded():
    clean, poisoned, _ = planted(n=20)
    est = fr.Estimator(identity_model(), ["feat"])
    est.observe_pairs(clean, poisoned)
    before = {k: v.clone() for k, v in est.state_dict().items()}
    bad = clean.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations.*rows \\[3\\]"):
        est.observe(bad, poisoned=False)
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        est.observe_pairs(clean, bad)
    after = est.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    est.profile(mode="clamp")  # still usable


def test_empty_batches_are_no_ops_and_too_few_samples_are_clear():
    clean, poisoned, _ = planted(n=4)
    est = fr.Estimator(identity_model(), ["feat"], k=2)
    est.observe(clean[:0], poisoned=False)
    est.observe_pairs(clean[:0], poisoned[:0])
    assert est.stats == {}
    est.observe_pairs(clean[:1], poisoned[:1])
    with pytest.raises(ValueError, match="at least 2 clean samples"):
        est.profile(mode="clamp", k=1)
    est.observe(clean[1:], poisoned=False)
    with pytest.raises(ValueError, match="k=2 directions need at least 2 triggered samples, got 1"):
        est.profile(mode="clamp", k=2)
