"""The control-variate paired beta (Estimator(paired_beta="control_variate")): exact for a
blending trigger, the mean difference for one that only adds, kept through checkpoints, merges
and clones, and refused with a clear error where an older checkpoint lacks its statistics."""
from collections import OrderedDict

import pytest
import torch
from helpers import D, identity_model, planted
from torch import nn

import fire_repair as fr

CV = "control_variate"


def blend_data(n_clean=400, n_pairs=8, a=0.2, seed=0):
    """Clean rows in [0, 1]; the pairs are the brightest few, blended with a pattern p:
    x' = (1 - a) x + a p, so the pairs' own mean is far from the clean mean."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n_clean, D, generator=g)
    p = torch.rand(D, generator=g)
    twins = clean[clean.mean(1).argsort(descending=True)[:n_pairs]]
    return clean, twins, (1 - a) * twins + a * p, p


def estimator(paired_beta=CV, **kwargs):
    return fr.Estimator(identity_model(), ["feat"], k=1, paired_beta=paired_beta, **kwargs)


def test_control_variate_beta_is_exact_for_a_blend():
    clean, twins, blended, p = blend_data()
    est, plain = estimator(), estimator("mean")
    for e in (est, plain):
        e.observe(clean, poisoned=False)
        e.observe_pairs(twins, blended)
    expected = 0.2 * (p - est.stats["feat"].clean_mean().float())  # the trigger's shift at the clean mean
    layer = est.profile(mode="gated").layer("feat")
    torch.testing.assert_close(layer.beta, expected, rtol=1e-5, atol=1e-6)
    assert est.stats["feat"].pair_slope() == pytest.approx(-0.2, abs=1e-6)  # the rows are fp32
    # not vacuous: the mean difference of these pairs is far from it
    assert (plain.profile(mode="gated").layer("feat").beta - expected).norm() > 0.1 * expected.norm()
    assert est.profile(mode="gated").info["layers"]["feat"]["paired_beta"] == CV


def test_control_variate_is_the_mean_difference_when_the_trigger_only_adds():
    clean, poisoned, u = planted()
    est = estimator()
    est.observe_pairs(clean, poisoned)
    layer = est.profile(mode="project").layer("feat")
    torch.testing.assert_close(layer.beta, 3.0 * u[0], rtol=1e-5, atol=1e-5)


def test_one_pair_falls_back_to_the_difference():
    clean, twins, blended, _ = blend_data(n_pairs=1)
    est = estimator()
    est.observe(clean, poisoned=False)
    est.observe_pairs(twins, blended)
    torch.testing.assert_close(est.profile(mode="gated").layer("feat").beta, (blended - twins)[0])


def test_control_variate_survives_checkpoints_merges_and_clones(tmp_path):
    from safetensors.torch import load_file, save_file

    clean, twins, blended, _ = blend_data(n_pairs=12)
    whole = estimator()
    whole.observe(clean, poisoned=False)
    whole.observe_pairs(twins, blended)
    want = whole.profile(mode="gated").layer("feat").beta

    save_file(whole.state_dict(), str(tmp_path / "est.safetensors"))
    back = estimator().load_state_dict(load_file(str(tmp_path / "est.safetensors")))
    assert torch.equal(back.profile(mode="gated").layer("feat").beta, want)

    left, right = estimator(), estimator()
    left.observe(clean, poisoned=False)
    left.observe_pairs(twins[:5], blended[:5])
    right.observe_pairs(twins[5:], blended[5:])
    torch.testing.assert_close(left.merge(right).profile(mode="gated").layer("feat").beta, want)

    twin = whole.clone()
    assert twin.paired_beta == CV
    assert torch.equal(twin.profile(mode="gated").layer("feat").beta, want)


def test_an_older_checkpoint_keeps_the_mean_and_refuses_the_control_variate():
    clean, twins, blended, _ = blend_data()
    est = estimator("mean")
    est.observe(clean, poisoned=False)
    est.observe_pairs(twins, blended)
    # an earlier release's: without the pairs' moments, and without a checksum
    old = {k: v for k, v in est.state_dict().items() if "sum_pair_" not in k and not k.endswith("/sha256")}
    with pytest.raises(ValueError, match="allow_unverified"):
        estimator("mean").load_state_dict(old)
    mean = estimator("mean").load_state_dict(old, allow_unverified=True)
    assert torch.equal(mean.profile(mode="gated").layer("feat").beta, est.profile(mode="gated").layer("feat").beta)
    with pytest.raises(ValueError, match="checkpoint without the pairs' moments"):
        estimator().load_state_dict(old, allow_unverified=True).profile(mode="gated")
    # a merge cannot make them up either
    merged = estimator().merge(estimator().load_state_dict(old, allow_unverified=True))
    with pytest.raises(ValueError, match="observed again"):
        merged.profile(mode="gated")
    # an older checkpoint of clean rows only: pairs observed afterwards have their moments
    clean_only = estimator("mean")
    clean_only.observe(clean, poisoned=False)
    resumed = estimator().load_state_dict({k: v for k, v in clean_only.state_dict().items()
                                           if "sum_pair_" not in k and not k.endswith("/sha256")},
                                          allow_unverified=True)
    resumed.observe_pairs(twins, blended)
    reference = estimator()
    reference.observe(clean, poisoned=False)
    reference.observe_pairs(twins, blended)
    torch.testing.assert_close(resumed.profile(mode="gated").layer("feat").beta,
                               reference.profile(mode="gated").layer("feat").beta)


def test_bad_paired_beta_is_refused():
    with pytest.raises(ValueError, match="paired_beta"):
        estimator("median")


def test_control_variate_per_position_is_exact_for_a_blend_of_tokens():
    # tokens (N, T, C) through an identity layer; the blend is the same at every position
    g = torch.Generator().manual_seed(3)
    C, T, a = 6, 5, 0.2
    clean = torch.rand(300, T, C, generator=g)
    p = torch.rand(C, generator=g)
    twins = clean[clean.mean((1, 2)).argsort(descending=True)[:8]]
    model = nn.Sequential(OrderedDict(feat=nn.Identity()))
    est = fr.Estimator(model, ["feat"], k=1, per_position=True, channel_dim=-1, touched=1e-9, paired_beta=CV)
    est.observe(clean, poisoned=False)
    est.observe_pairs(twins, (1 - a) * twins + a * p)
    expected = a * (p - est.stats["feat"].clean_mean().float())
    torch.testing.assert_close(est.profile(mode="gated").layer("feat").beta, expected, rtol=1e-5, atol=1e-6)
