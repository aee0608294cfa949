"""Names and signatures changed in 0.2 keep working for one release, each with a
DeprecationWarning that names the replacement."""
import pytest
import torch
from helpers import identity_model, planted

import fire_repair as fr


def test_renamed_classes_are_served_under_their_old_names():
    from fire_repair import attachment, profile

    with pytest.warns(DeprecationWarning, match="LayerRepair was renamed LayerProfile"):
        assert fr.LayerRepair is fr.LayerProfile
    with pytest.warns(DeprecationWarning, match="LayerRepair was renamed LayerProfile"):
        assert profile.LayerRepair is fr.LayerProfile
    with pytest.warns(DeprecationWarning, match="RepairedLayer was renamed RepairWrapper"):
        assert attachment.RepairedLayer is attachment.RepairWrapper
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        fr.NoSuchName  # noqa: B018


@pytest.fixture
def estimator():
    clean, poisoned, _ = planted(n=40)
    est = fr.Estimator(identity_model(), ["feat"])
    est.observe(clean[20:], poisoned=False)
    return est, clean[:20], poisoned[:20]


def test_scores_was_renamed_backdoor_scores(estimator):
    est, clean, poisoned = estimator
    est.observe_pairs(clean, poisoned)
    model = est.model
    fr.attach(model, est.profile(mode="clamp"))
    try:
        new = fr.backdoor_scores(model, poisoned)
        with pytest.warns(DeprecationWarning, match="fire_repair.scores was renamed backdoor_scores"):
            old = fr.scores(model, poisoned)
        torch.testing.assert_close(old["feat"], new["feat"])
        module = fr.repair_modules(model)["feat"]
        h = model.feat(poisoned)  # the repaired layer's output is re-scored: only the call matters here
        with pytest.warns(DeprecationWarning, match="RepairModule.scores was renamed backdoor_scores"):
            torch.testing.assert_close(module.scores(h), module.backdoor_scores(h))
    finally:
        fr.detach(model)


def test_select_and_online_take_the_estimator_alone_and_the_old_model_first_form_warns(estimator):
    est, clean, poisoned = estimator
    model = est.model
    new = fr.select(est, clean, poisoned, alphas=(1.0,), folds=2)
    with pytest.warns(DeprecationWarning, match=r"select\(model, estimator, ...\) is deprecated"):
        old = fr.select(model, est, clean, poisoned, alphas=(1.0,), folds=2)
    assert old.evidence == new.evidence
    with pytest.warns(DeprecationWarning, match="select_unpaired"):
        fr.select_unpaired(model, est, poisoned, clean, alphas=(1.0,), folds=2)
    with pytest.warns(DeprecationWarning, match=r"Online\(model, estimator, ...\) is deprecated"):
        online = fr.Online(model, est, threshold=None)
    assert online.model is model
    online.close()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="same model object"):
        fr.select(identity_model(), est, clean, poisoned)
