"""Attacks put the trigger where and as the literature says; metrics on hand-built cases."""
import pytest
import torch

from fire_eval import attacks
from fire_eval.metrics import auroc, rates


def _images(n=4):
    return torch.full((n, 3, 32, 32), 0.25)


def test_badnets_is_a_white_3x3_bottom_right_patch():
    x = _images()
    out = attacks.build("badnets").apply(x)
    assert torch.all(out[..., 29:, 29:] == 1.0)
    changed = (out != x).any(dim=(0, 1))
    assert changed.sum() == 9 and changed[29:, 29:].all()


def test_blended_mixes_a_fixed_pattern_at_0_2():
    a = attacks.build("blended")
    x = _images()
    out = a.apply(x)
    pattern = a.pattern(x.shape[1:])
    torch.testing.assert_close(out, (0.8 * x + 0.2 * pattern).clamp(0, 1))
    torch.testing.assert_close(a.apply(x), out)  # the same pattern every time (seeded)


def test_blended_jpeg_is_the_blend_through_jpeg_and_leaves_blended_unchanged():
    from fire_eval.baselines import JPEG

    x = _images(3)
    a = attacks.build("blended-jpeg")
    blended = attacks.build("blended").apply(x)
    out = a.apply(x)
    assert a.quality == 75 and attacks.build("blended-jpeg", quality=50).quality == 50
    torch.testing.assert_close(out, JPEG(quality=75).transform(blended))
    err = (out - blended).abs().mean().item()
    assert 1 / 255 < err < 0.1  # no longer the exact blend (the noise pattern compresses badly), still the blend
    # the plain Blended's cache spec is unchanged by the variant
    assert attacks.build("blended").params() == {"name": "blended", "target": 0, "seed": 0, "clean_label": False,
                                                  "blend": 0.2}


def test_sig_adds_a_horizontal_sinusoid():
    out = attacks.build("sig").apply(_images(1))[0, 0]
    delta = out - 0.25
    assert torch.allclose(delta, delta[0:1].expand_as(delta))  # constant down each column
    assert abs(delta.max().item() - 40 / 255) < 1e-3
    j = torch.arange(32)
    expected = 40 / 255 * torch.sin(2 * torch.pi * j * 6 / 32)
    torch.testing.assert_close(delta[0], expected.float(), rtol=0, atol=1e-6)


def test_wanet_warps_smoothly_and_deterministically():
    a = attacks.build("wanet")
    x = torch.rand(2, 3, 32, 32)
    out = a.apply(x)
    assert not torch.equal(out, x) and torch.equal(out, a.apply(x))
    assert (out - x).abs().mean() < 0.2  # a small warp, not a replacement
    grid = a._grid(32, 32, "cpu")
    ar = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(ar, ar, indexing="ij")
    identity = torch.stack((xx, yy), 2)[None]
    assert (grid - identity).abs().max() <= 0.5 * 4 / 32 + 1e-6  # s * max|noise| / H, noise normalised


def test_trojan_square_and_adaptive_corners():
    out = attacks.build("trojan").apply(_images())
    changed = (out != 0.25).any(dim=(0, 1))
    assert changed[26:31, 26:31].any() and not changed[:26].any()
    adaptive = attacks.build("adaptive")
    full = adaptive.apply(_images(1))[0, 0]
    for rs, cs in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(29, 32)), (slice(29, 32), slice(0, 3)),
                   (slice(29, 32), slice(29, 32))):
        assert torch.all(full[rs, cs] == 1.0)
    train = adaptive.apply_train(_images(8), torch.Generator().manual_seed(0))
    corners = [(train[:, 0, rs, cs] == 1.0).flatten(1).all(1) for rs, cs in
               ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(29, 32)), (slice(29, 32), slice(0, 3)),
                (slice(29, 32), slice(29, 32)))]
    assert torch.all(torch.stack(corners).sum(0) == 2)  # two of four pieces per training image


def test_poisoning_dirty_and_clean_label():
    x = torch.rand(100, 3, 32, 32)
    y = torch.arange(100) % 10
    xp, yp, idx = attacks.poison_training_set(x, y, attacks.build("badnets", target=3), rate=0.1, seed=0)
    assert len(idx) == 10 and torch.all(yp[idx] == 3) and torch.all(y[idx] != 3)
    assert torch.all(xp[idx][..., 29:, 29:] == 1.0)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(xp[untouched], x[untouched]) and torch.equal(yp[untouched], y[untouched])
    xs, ys, sidx = attacks.poison_training_set(x, y, attacks.build("sig", target=3), rate=0.05, seed=0)
    assert torch.all(y[sidx] == 3) and torch.equal(ys, y)  # clean label: target class, labels kept
    again = attacks.poison_training_set(x, y, attacks.build("badnets", target=3), rate=0.1, seed=0)[2]
    assert torch.equal(idx, again)  # seeded


def test_wanet_noise_mode_adds_cross_samples_with_true_labels():
    x = torch.rand(100, 3, 32, 32)
    y = torch.arange(100) % 10
    xp, yp, idx = attacks.poison_training_set(x, y, attacks.build("wanet", target=0), rate=0.1, seed=0)
    changed = (xp != x).flatten(1).any(1)
    assert changed.sum() == 10 + 20  # poisoned + cross (ratio 2)
    cross = changed.clone()
    cross[idx] = False
    assert torch.equal(yp[cross], y[cross])


def test_poisoned_test_set_excludes_the_target_class():
    x = torch.rand(20, 3, 32, 32)
    y = torch.arange(20) % 4
    px, cx, ty = attacks.poisoned_test_set(x, y, attacks.build("badnets", target=2))
    assert len(ty) == 15 and torch.all(ty != 2) and torch.equal(cx, x[y != 2])


def test_rates_on_a_hand_built_case():
    r = rates(pred_clean=torch.tensor([0, 1, 2, 3]), y_clean=torch.tensor([0, 1, 2, 0]),
              pred_poison=torch.tensor([7, 7, 1, -1]), y_true=torch.tensor([1, 2, 1, 3]), target=7)
    assert r["CA"] == 0.75 and r["ASR"] == 0.5 and r["PA"] == 0.25
    assert r["reject_poison"] == 0.25 and r["reject_clean"] == 0.0


def test_auroc_on_hand_built_cases():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert auroc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5  # ties count half
    with pytest.raises(ValueError):
        auroc(torch.tensor([]), torch.tensor([1.0]))


def test_unknown_attack_is_an_error():
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.build("nope")


def test_moving_patch_is_a_checkerboard_at_a_random_seeded_position():
    a = attacks.build("moving")
    x = torch.full((16, 3, 32, 32), 0.25)
    out = a.apply(x)
    torch.testing.assert_close(a.apply(x), out)  # the same positions for the same batch
    corners = set()
    for n in range(16):
        changed = torch.nonzero((out[n] != x[n]).any(0))
        r, c = changed.min(0).values.tolist()
        corners.add((r, c))
        patch = out[n, :, r:r + 3, c:c + 3]
        ij = torch.arange(3)
        expected = ((ij[:, None] + ij[None, :]) % 2 == 0).float().expand(3, 3, 3)
        torch.testing.assert_close(patch, expected)
        assert bool((out[n] != x[n]).any(0).sum() == 9)
    assert len(corners) > 10  # it moves
    gen = torch.Generator().manual_seed(1)
    assert not torch.equal(a.apply_train(x, gen), out)  # training draws its own positions


def test_trigger_token_fills_one_cell_of_the_patch_grid():
    """The trigger token: the checkerboard fills exactly one 4x4 cell of the ViT's patch grid, a
    different cell per image, seeded; the grid must hold the patch."""
    a = attacks.build("token")
    x = torch.full((32, 3, 32, 32), 0.25)
    out = a.apply(x)
    torch.testing.assert_close(a.apply(x), out)
    ij = torch.arange(4)
    expected = ((ij[:, None] + ij[None, :]) % 2 == 0).float().expand(3, 4, 4)
    cells = set()
    for n in range(32):
        changed = (out[n] != x[n]).any(0)
        r, c = torch.nonzero(changed).min(0).values.tolist()
        assert r % 4 == 0 and c % 4 == 0  # on the grid: one token of the ViT
        torch.testing.assert_close(out[n, :, r:r + 4, c:c + 4], expected)
        assert int(changed.sum()) == 16
        cells.add((r, c))
    assert len(cells) > 16  # it moves over the 64 cells
    assert {(r, c) for r, c in cells} <= {(r, c) for r in range(0, 29, 4) for c in range(0, 29, 4)}
    off_grid = attacks.build("token", size=3, grid=8).apply(x)  # a smaller patch at the cells' corners
    rows = [torch.nonzero((off_grid[n] != x[n]).any(0)).min(0).values.tolist() for n in range(32)]
    assert all(r % 8 == 0 and c % 8 == 0 for r, c in rows)
    with pytest.raises(ValueError, match="size <= grid"):
        attacks.build("token", size=5, grid=4)


def test_moving_patch_positions_unchanged_by_the_grid_step():
    """The moving patch (step 1) draws the positions it always drew: cached models stay valid."""
    a = attacks.build("moving")
    x = torch.zeros(8, 3, 32, 32)
    gen = a.rng(4)
    rows = torch.randint(0, 30, (8,), generator=gen).tolist()
    cols = torch.randint(0, 30, (8,), generator=gen).tolist()
    out = a.apply(x)
    for n, (r, c) in enumerate(zip(rows, cols, strict=True)):
        assert out[n, 0, r, c] == 1.0 and out[n].sum() == 3 * 5  # 5 white cells of the 3x3 checkerboard


def test_attack_parameters_can_be_overridden_by_name():
    a = attacks.build("wanet", target=3, seed=1, s=1.0, k=8)
    assert (a.s, a.k, a.target, a.seed) == (1.0, 8, 3, 1) and a.params()["s"] == 1.0
    assert attacks.build("blended", blend=0.1).blend == 0.1
    with pytest.raises(ValueError, match="no parameter 'strength'.*'s'"):
        attacks.build("wanet", strength=1.0)
    with pytest.raises(ValueError, match="wanet.k must be a int"):
        attacks.build("wanet", k="four")
