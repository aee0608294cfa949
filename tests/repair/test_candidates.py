"""`fire_repair.candidates`: the grid selection scores, its validation and its order."""
import math

import pytest
import torch

from fire_repair.candidates import Candidates


def _grid(**kw):
    base = dict(layer_sets=[["a"], ["a", "b"]], modes=["clamp", "project"], alphas=[1.0, 2.0],
                tau_quantile=[0.9, 0.99], folds=4, seed=0, max_clean_change=0.01, clean_cost="expected_drop",
                tie_break="twin_kl", agreement_slack=1)
    return Candidates(**{**base, **kw})


def test_validate_gives_the_tau_candidates_and_the_folds():
    quantiles, splits = _grid().validate({"a", "b"}, 16)
    assert quantiles == {"clamp": (0.9, 0.99), "project": (None,)}
    assert sorted(torch.cat(splits).tolist()) == list(range(16)) and len(splits) == 4


@pytest.mark.parametrize("kw, message", [
    (dict(max_clean_change=math.nan), "max_clean_change"),
    (dict(layer_sets=[["c"]]), r"layer\(s\) \['c'\]"),
    (dict(tau_quantile=1.5), "tau_quantile"),
    (dict(clean_cost="flips"), "clean_cost"),
    (dict(tie_break="largest"), "tie_break"),
    (dict(agreement_slack=-1), "agreement_slack"),
])
def test_validate_refuses_each_invalid_field(kw, message):
    with pytest.raises(ValueError, match=message):
        _grid(**kw).validate({"a", "b"}, 16)


def test_an_estimator_scores_the_sets_it_watches_in_grid_order():
    grid = _grid()
    assert grid.sets_for(["a"]) == [["a"]]
    assert _grid(layer_sets=None).sets_for(["b", "a"]) == [["b"], ["a"]]
    quantiles, _ = grid.validate({"a", "b"}, 16)
    points = grid.points([["a"]], quantiles)
    assert points[:3] == [(["a"], "clamp", 0.9, 1.0), (["a"], "clamp", 0.9, 2.0), (["a"], "clamp", 0.99, 1.0)]
    assert len(points) == (2 + 1) * 2
