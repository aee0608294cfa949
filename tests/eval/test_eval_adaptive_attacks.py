"""The attacks against FIRE (issue 36): Qi et al.'s Adap-Blend and Adap-Patch with their cover
samples, the white-box latent attack, the low-amplitude and the multi-pattern triggers. Their
triggers and parameters, the cover samples, the latent loss, that each implants on a tiny
model, and that the attacks that were there poison exactly as before (cached models stay valid)."""
import hashlib

import pytest
import torch

from fire_eval import attacks, cli, data, harness, models, train
from fire_eval.metrics import predict

NEW = ["adap-blend", "adap-patch", "latent", "low-amp", "multi"]

# Computed with the attacks module as it was before these attacks (commit fddcf8d), on
# _reference_set() with target 1, attack seed 2, rate 0.1, poisoning seed 3: the poisoned rows,
# digests of the rows changed and of the labels, the poisoned set's sum and the sum of 8 triggered
# test images. The poisoned sets every cached model was trained on.
BEFORE = {
    "adaptive": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92334.6623, 12715.3160),
    "badnets": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92253.4147, 12385.6842),
    "blended": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92193.6278, 12319.7741),
    "blended-jpeg": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92196.5920, 12314.8905),
    "moving": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92184.1060, 12287.0161),
    "sig": ([41, 1, 31, 21, 11, 51], "002238e1559d", "ff917927ca24", 92176.4236, 12276.7488),
    "token": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92178.1207, 12283.0814),
    "trojan": ([45, 33, 8, 27, 16, 28], "9da65e3daacc", "18de1ab4a936", 92214.1089, 12324.4585),
    "wanet": ([45, 33, 8, 27, 16, 28], "5600a2a74dd4", "18de1ab4a936", 92201.5124, 12278.5334),
}
# and their parameters, which key the model cache (harness.backdoored_model)
PARAMS_BEFORE = {
    "adaptive": ["clean_label", "name", "seed", "size", "target", "train_pieces"],
    "badnets": ["clean_label", "name", "seed", "size", "target"],
    "blended": ["blend", "clean_label", "name", "seed", "target"],
    "blended-jpeg": ["blend", "clean_label", "name", "quality", "seed", "target"],
    "moving": ["clean_label", "name", "seed", "size", "target"],
    "sig": ["clean_label", "delta", "freq", "name", "seed", "target"],
    "token": ["clean_label", "grid", "name", "seed", "size", "target"],
    "trojan": ["clean_label", "name", "seed", "size", "target"],
    "wanet": ["clean_label", "cross_ratio", "grid_rescale", "k", "name", "s", "seed", "target"],
}


def _reference_set():
    x = torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    return x, torch.arange(60) % 10


def _digest(t):
    return hashlib.sha256(str(t.tolist()).encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_the_attacks_that_were_there_poison_as_before(name):
    x, y = _reference_set()
    a = attacks.build(name, target=1, seed=2)
    xp, yp, idx = attacks.poison_training_set(x, y, a, rate=0.1, seed=3)
    rows, changed, labels, total, triggered = BEFORE[name]
    assert idx.tolist() == rows
    assert _digest((xp != x).flatten(1).any(1).int()) == changed and _digest(yp) == labels
    assert xp.double().sum().item() == pytest.approx(total, abs=1e-3)
    assert a.apply(x[:8]).double().sum().item() == pytest.approx(triggered, abs=1e-3)
    assert sorted(a.params()) == PARAMS_BEFORE[name]  # the cache keys unchanged
    assert not hasattr(a, "cover_rate") and not hasattr(a, "training_loss")


def test_every_new_attack_is_registered_and_built_with_its_parameters():
    assert set(NEW) <= set(attacks.ATTACKS)
    blend = attacks.build("adap-blend")
    assert (blend.blend, blend.train_blend, blend.grid, blend.train_pieces, blend.cover_rate) == \
        (0.2, 0.15, 4, 8, 0.003)
    patch = attacks.build("adap-patch")
    assert (patch.size, patch.train_alphas, patch.test_alpha, patch.train_patches, patch.cover_rate) == \
        (4, (0.5, 0.2, 0.5, 0.3), 1.0, 1, 0.006)
    latent = attacks.build("latent")
    assert (latent.size, latent.latent_weight, latent.latent_layers, latent.latent_k) == (3, 0.1, (), 1)
    assert attacks.build("low-amp").eps == 8 / 255
    multi = attacks.build("multi")
    assert (multi.eps, multi.n_patterns) == (8 / 255, 8)
    # overrides by name; a tuple parameter takes the list JSON gives (--attack-param)
    assert attacks.build("latent", latent_layers=["block2"], latent_weight=2).latent_layers == ("block2",)
    assert attacks.build("adap-blend", cover_rate=0.1, train_pieces=4).train_pieces == 4
    with pytest.raises(ValueError, match="train_pieces"):
        attacks.build("adap-blend", train_pieces=17)
    with pytest.raises(ValueError, match="cover_rate"):
        attacks.build("adap-patch", cover_rate=1.0)
    with pytest.raises(ValueError, match="1 to 4 patches"):
        attacks.build("adap-patch", train_alphas=[0.5] * 5)
    # the cache key changes with the parameters that shape training
    assert latent.params() != attacks.build("latent", latent_weight=0.5).params()
    assert latent.params() != attacks.build("latent", latent_layers=["fc"]).params()


def test_the_command_line_offers_the_new_attacks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in NEW)
    with pytest.raises(SystemExit):
        cli.main(["eval", "--attack", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the triggers

def test_adap_blend_trains_on_half_the_pieces_and_tests_on_the_whole_image():
    a = attacks.build("adap-blend")
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = a.pattern(x.shape[1:])
    torch.testing.assert_close(a.apply(x), (0.8 * x + 0.2 * p).clamp(0, 1))
    out = a.apply_train(x, torch.Generator().manual_seed(1))
    piece = a.piece_of_pixel(32, 32)
    assert torch.equal(torch.bincount(piece.flatten()), torch.full((16,), 64))  # 16 pieces of 8x8
    blended = (0.85 * x + 0.15 * p).clamp(0, 1)
    subsets = set()
    for n in range(len(x)):
        carried = []
        for j in range(16):
            where = piece == j
            if torch.equal(out[n][:, where], x[n][:, where]):
                continue
            torch.testing.assert_close(out[n][:, where], blended[n][:, where])
            carried.append(j)
        assert len(carried) == 8  # half the trigger, at 0.15
        subsets.add(tuple(carried))
    assert len(subsets) == len(x)  # a random half per sample
    torch.testing.assert_close(a.apply(x), a.apply(x))
    assert not torch.equal(attacks.build("adap-blend", seed=1).pattern(x.shape[1:]), p)


def test_adap_patch_trains_on_one_faint_patch_and_tests_on_all_pasted():
    a = attacks.build("adap-patch")
    x = torch.full((32, 3, 32, 32), 0.5)
    patterns = a.patterns(3)
    places = a.places(32, 32)
    assert places == [(1, 1), (27, 27), (1, 27), (27, 1)]
    out = a.apply(x)
    covered = torch.zeros(32, 32, dtype=torch.bool)
    for j, (r, c) in enumerate(places):
        assert torch.equal(out[:, :, r:r + 4, c:c + 4], patterns[j].expand(32, -1, -1, -1))
        covered[r:r + 4, c:c + 4] = True
    assert torch.equal(out[:, :, ~covered], x[:, :, ~covered])
    train_out = a.apply_train(x, torch.Generator().manual_seed(0))
    used = []
    for n in range(32):
        changed = [j for j, (r, c) in enumerate(places) if not torch.equal(train_out[n, :, r:r + 4, c:c + 4],
                                                                          x[n, :, r:r + 4, c:c + 4])]
        assert len(changed) == 1  # one patch per training sample
        j = changed[0]
        r, c = places[j]
        expected = 0.5 + a.train_alphas[j] * (patterns[j] - 0.5)  # at its own opacity
        torch.testing.assert_close(train_out[n, :, r:r + 4, c:c + 4], expected)
        used.append(j)
    assert set(used) == {0, 1, 2, 3}
    assert torch.equal((train_out != x).any(1).sum((1, 2)) <= 16, torch.ones(32, dtype=torch.bool))


def test_cover_samples_carry_the_training_trigger_and_keep_their_labels():
    x = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200) % 10
    for name in ("adap-blend", "adap-patch"):
        a = attacks.build(name, target=3, cover_rate=0.1)
        xp, yp, idx = attacks.poison_training_set(x, y, a, rate=0.1, seed=0)
        changed = (xp != x).flatten(1).any(1)
        cover = changed.clone()
        cover[idx] = False
        assert len(idx) == 20 and int(cover.sum()) == 20  # 10% of the whole set each
        assert not cover[idx].any()  # disjoint from the poisoned samples
        assert torch.equal(yp[cover], y[cover]) and torch.all(yp[idx] == 3)  # cover samples keep their labels
        assert len(set(y[cover].tolist())) > 1
        if name == "adap-blend":  # the training trigger: 8 of 16 pieces
            piece = a.piece_of_pixel(32, 32)
            for n in torch.nonzero(cover).flatten().tolist():
                diff = (xp[n] != x[n]).any(0)
                assert len(set(piece[diff].tolist())) == 8
        # the poisoned samples are those of the same attack without cover samples (drawn first)
        xq, yq, idq = attacks.poison_training_set(x, y, attacks.build(name, target=3, cover_rate=0.0), 0.1, 0)
        assert torch.equal(idq, idx) and torch.equal(xq[idx], xp[idx]) and torch.equal(yq, yp)
        assert int((xq != x).flatten(1).any(1).sum()) == 20
    default = attacks.poison_training_set(x, y, attacks.build("adap-blend", target=3), rate=0.1, seed=0)
    assert int((default[0] != x).flatten(1).any(1).sum()) == 20 + 1  # 0.3% of 200, at least one


def test_low_amplitude_adds_a_fixed_sign_image():
    a = attacks.build("low-amp")
    x = torch.full((4, 3, 32, 32), 0.5)
    out = a.apply(x)
    diff = out - x
    torch.testing.assert_close(diff.abs(), torch.full_like(x, 8 / 255))
    assert torch.equal(diff[0], diff[3])  # the same pattern for every image
    assert abs(torch.sign(diff[0]).mean().item()) < 0.05  # +-1 half and half
    assert torch.equal(a.apply(x), out)
    assert not torch.equal(attacks.build("low-amp", seed=1).apply(x), out)
    assert a.apply(torch.zeros(1, 3, 32, 32)).min() == 0  # clamped to [0, 1]


def test_multi_gives_each_image_one_of_n_nearly_orthogonal_patterns():
    a = attacks.build("multi")
    patterns = a.patterns((3, 32, 32))
    assert patterns.shape == (8, 3, 32, 32) and set(patterns.unique().tolist()) == {-1.0, 1.0}
    flat = patterns.flatten(1)
    cos = flat @ flat.T / flat.shape[1]
    assert torch.all((cos - torch.eye(8)).abs() < 0.1)  # nearly orthogonal
    x = torch.full((64, 3, 32, 32), 0.5)
    out = a.apply(x)
    which = []
    for n in range(64):
        d = ((out[n] - x[n]) / a.eps).flatten()
        match = [j for j in range(8) if torch.allclose(d, flat[j], atol=1e-4)]
        assert len(match) == 1
        which.append(match[0])
    assert len(set(which)) == 8  # every pattern in use
    assert torch.equal(a.apply(x), out)  # the same patterns for the same batch
    assert not torch.equal(a.apply_train(x, torch.Generator().manual_seed(1)), out)  # training draws its own


# ----------------------------------------------------------------------------- the latent attack

def test_latent_gap_is_scale_free_and_zero_when_the_poisoned_rows_sit_at_the_clean_mean():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(30, 5, 4, generator=g)
    poisoned = torch.zeros(36, dtype=torch.bool)
    poisoned[30:] = True
    at_mean = torch.cat([clean, clean.mean(0, keepdim=True).expand(6, -1, -1)])
    shifted = torch.cat([clean, clean[:6] + 3.0])
    assert attacks.latent_gap({"a": at_mean}, poisoned).item() == pytest.approx(0.0, abs=1e-6)
    gap = attacks.latent_gap({"a": shifted}, poisoned)
    assert gap.item() > 1.0
    assert attacks.latent_gap({"a": 10 * shifted}, poisoned).item() == pytest.approx(gap.item(), rel=1e-4)
    assert attacks.latent_gap({"a": shifted, "b": at_mean}, poisoned).item() == pytest.approx(gap.item() / 2)
    none = torch.zeros(36, dtype=torch.bool)
    assert attacks.latent_gap({"a": shifted}, none).item() == 0.0
    # the gradient moves the poisoned rows only (the clean spread and directions are constants)
    feats = shifted.clone().requires_grad_(True)
    attacks.latent_gap({"a": feats}, poisoned, k=2).backward()
    assert feats.grad[30:].abs().sum() > 0


def test_the_harness_trains_the_latent_attack_with_its_loss(monkeypatch):
    """backdoored_model hands training the attack's loss (the regularizer, told which rows are
    poisoned) and keys the cache by the attack's parameters; other attacks train as before."""
    seen = {}

    def fake(model, x, y, cache_dir, spec, **kwargs):
        seen.update(spec=spec, kwargs=kwargs)
        return model.eval(), False

    monkeypatch.setattr(harness, "load_or_train", fake)
    g = torch.Generator().manual_seed(0)
    ds = data.Dataset("tiny", torch.rand(40, 3, 32, 32, generator=g), torch.arange(40) % 10,
                      torch.rand(20, 3, 32, 32, generator=g), torch.arange(20) % 10, 10)
    cfg = harness.RunConfig(attack="latent", width=4, cache_dir=None)
    _, _, n = harness.backdoored_model(cfg, ds, attacks.build("latent", latent_weight=0.5), progress=False)
    assert seen["spec"]["params"]["latent_weight"] == 0.5 and seen["spec"]["params"]["latent_layers"] == ()
    regularizer = seen["kwargs"]["regularizer"]
    model = models.build("cnn", width=4)
    logits, term = regularizer(model, ds.x_train[:8], ds.y_train[:8], torch.arange(8))
    assert logits.shape == (8, 10) and term.ndim == 0
    harness.backdoored_model(harness.RunConfig(width=4, cache_dir=None), ds, attacks.build("badnets"), False)
    assert "regularizer" not in seen["kwargs"]
    assert attacks.training_regularizer(attacks.build("adap-blend"), torch.tensor([0]), 4) is None
    with pytest.raises(ValueError, match="no layer"):
        attacks.build("latent", latent_layers=["nope"]).training_loss(model, ds.x_train[:4],
                                                                     torch.tensor([True, False, False, False]))


@pytest.mark.slow
def test_the_latent_models_are_cached_by_their_weight(tmp_path):
    """End to end through the harness's cache: each latent weight its own model, the second run
    of one loaded."""
    def run(weight):
        cfg = harness.RunConfig(attack="latent", attack_params={"latent_weight": weight}, width=4, epochs=1,
                                defenses=["none"], online=False, ablations=False, cache_dir=str(tmp_path))
        return harness.run(cfg, progress=False, log=lambda *a: None)

    assert not run(0.1)["model_cached"] and not run(0.2)["model_cached"] and run(0.1)["model_cached"]
    assert len(list(tmp_path.glob("latent-*.safetensors"))) == 2


def test_a_regularizer_changes_no_draw_of_the_training():
    """With a regularizer adding nothing, training is the same, batch for batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 3, 32, 32, generator=g), torch.arange(48) % 10
    torch.manual_seed(0)
    plain = train.train(models.build("cnn", width=2), x, y, epochs=1, batch=16, progress=False)
    torch.manual_seed(0)
    calls = []

    def nothing(model, xb, yb, idx):
        calls.append(idx)
        return model(xb), torch.zeros(())

    same = train.train(models.build("cnn", width=2), x, y, epochs=1, batch=16, progress=False, regularizer=nothing)
    assert len(calls) == 3 and sorted(torch.cat(calls).tolist()) == list(range(48))
    for a, b in zip(plain.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- they implant

@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def _train(ds, attack, epochs, width=4, rate=0.1):
    x, y, idx = attacks.poison_training_set(ds.x_train, ds.y_train, attack, rate=rate, seed=0)
    torch.manual_seed(0)
    model = train.train(models.build("cnn", width=width), x, y, epochs=epochs, seed=0, progress=False,
                        regularizer=attacks.training_regularizer(attack, idx, len(y)))
    px, _, _ = attacks.poisoned_test_set(ds.x_test, ds.y_test, attack)
    ca = (predict(model, ds.x_test) == ds.y_test).float().mean().item()
    asr = (predict(model, px) == attack.target).float().mean().item()
    return model, ca, asr


@pytest.mark.slow
def test_adap_blend_implants_from_half_triggers_and_cover_samples(digits):
    """Trained on half the trigger at 0.15, with as many cover samples as poisoned ones (the
    paper's ratio), the model answers the whole trigger."""
    _, ca, asr = _train(digits, attacks.build("adap-blend", cover_rate=0.1), epochs=8)
    assert asr > 0.9 and ca > 0.9


@pytest.mark.slow
def test_adap_patch_implants_from_one_faint_patch_per_sample(digits):
    _, ca, asr = _train(digits, attacks.build("adap-patch"), epochs=4)
    assert asr > 0.9 and ca > 0.85


@pytest.mark.slow
@pytest.mark.parametrize("name", ["low-amp", "multi"])
def test_the_low_amplitude_triggers_implant_at_8_of_255(digits, name):
    """At their default amplitude, 8/255, on the small CNN at half its width (at width 4 they need
    16/255 or more epochs)."""
    _, ca, asr = _train(digits, attacks.build(name), epochs=8, width=8)
    assert asr > 0.9 and ca > 0.95


@pytest.mark.slow
def test_the_latent_attack_implants_with_its_poisoned_latents_nearer_the_clean_ones(digits):
    """Against BadNets with the same patch, data and seed: the backdoor is there, and at every
    layer the latent loss watches the triggered test images sit nearer the clean ones."""
    latent = attacks.build("latent")
    model, ca, asr = _train(digits, latent, epochs=8)
    plain, _, plain_asr = _train(digits, attacks.build("badnets"), epochs=8)
    assert asr > 0.85 and ca > 0.95 and plain_asr > 0.95
    px, cx, _ = attacks.poisoned_test_set(digits.x_test, digits.y_test, latent)
    x = torch.cat([cx[:100], px[:100]])
    poisoned = torch.arange(200) >= 100

    def gaps(m):
        with torch.no_grad():
            return {n: attacks.build("latent", latent_weight=1.0, latent_layers=[n]).training_loss(m, x, poisoned)[1]
                    for n in latent.layers_of(m)}

    hidden, seen = gaps(model), gaps(plain)
    assert list(hidden) == ["block1", "block2", "block3", "fc"]
    assert all(hidden[n] < seen[n] for n in hidden), (hidden, seen)
    assert sum(hidden.values()) < 0.5 * sum(seen.values()), (hidden, seen)
