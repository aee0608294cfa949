"""`fire_repair.selection`: label-free, out-of-fold choice of mode, alpha and tau; its evidence."""
import warnings

import pytest
import torch

import fire_repair as fr
from fire_eval.metrics import predict


def _pa(model, b):
    return (predict(model, b["eval_poison"]) == b["eval_poison_y"]).float().mean().item()


def _pa_with(model, profile, b):
    fr.attach(model, profile)
    try:
        return _pa(model, b)
    finally:
        fr.detach(model)


def test_selection_takes_a_tau_quantile_per_mode(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    quantiles = {"clamp": 0.99, "gated": 0.999}
    for mode in quantiles:
        sel = fr.select(est, cx[:16], px[:16], modes=[mode], alphas=[1.0], tau_quantile=quantiles,
                        x_clean_reference=backdoored["hold_clean"])
        full = est.clone()
        full.observe_pairs(cx[:16], px[:16])
        expect = full.profile(mode=mode, alpha=1.0, tau_quantile=quantiles[mode]).layer("block2").tau
        torch.testing.assert_close(sel.profile.layer("block2").tau, expect)
    with pytest.raises(ValueError, match=r"no quantile for the mode\(s\) \['gated'\]"):
        fr.select(est, cx[:16], px[:16], modes=["clamp", "gated"], alphas=[1.0], tau_quantile={"clamp": 0.99})


def test_selection_chooses_tau_among_candidate_quantiles(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    sel = fr.select(est, cx[:16], px[:16], modes=["clamp", "project"], alphas=[1.0, 2.0],
                    tau_quantile={"clamp": [0.9, 0.99, 0.99]}, x_clean_reference=backdoored["hold_clean"])
    grid = sorted((e["mode"], e["tau_quantile"] or 0.0, e["alpha"]) for e in sel.evidence)
    # duplicates dropped; project reads no tau and is tried once per alpha
    assert grid == [("clamp", 0.9, 1.0), ("clamp", 0.9, 2.0), ("clamp", 0.99, 1.0), ("clamp", 0.99, 2.0),
                    ("project", 0.0, 1.0), ("project", 0.0, 2.0)]
    # the two quantiles give different repairs, told apart in the evidence
    by_q = {e["tau_quantile"]: e["twin_kl"] for e in sel.evidence if e["mode"] == "clamp" and e["alpha"] == 1.0}
    assert by_q[0.9] != by_q[0.99]
    chosen = sel.profile.info["selection"]["chosen"]
    assert chosen["tau_quantile"] == sel.tau_quantile
    assert (sel.tau_quantile is None) == (sel.mode not in fr.TAU_MODES)
    full = est.clone()
    full.observe_pairs(cx[:16], px[:16])
    kwargs = {} if sel.tau_quantile is None else {"tau_quantile": sel.tau_quantile}
    expect = full.profile(mode=sel.mode, alpha=sel.alpha, **kwargs).layer("block2")
    torch.testing.assert_close(sel.profile.layer("block2").tau, expect.tau)
    torch.testing.assert_close(sel.profile.layer("block2").directions, expect.directions)
    assert "tau_q" in sel.table().splitlines()[0]
    for bad in ([], [1.5], {"clamp": "high"}):
        with pytest.raises(ValueError, match="tau_quantile"):
            fr.select(est, cx[:16], px[:16], modes=["clamp"], alphas=[1.0], tau_quantile=bad)


def test_selection_is_label_free_and_reports_evidence(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block1", "block2", "block3", "fc"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    model.train()
    sel = fr.select(est, cx[:16], px[:16], modes=["clamp", "project"], alphas=[0.5, 1.0],
                    x_clean_reference=backdoored["hold_clean"], agreement_slack=0, tie_break="margin")
    assert model.training  # the caller's mode is restored
    model.eval()
    assert len(sel.evidence) == 4 * 2 * 2
    chosen = [e for e in sel.evidence if (e["layers"], e["mode"], e["alpha"]) == (sel.layers, sel.mode, sel.alpha)]
    assert chosen and chosen[0]["clean_change"] <= 0.01
    # clean_change is measured in rank order: every candidate ranked above the chosen one was measured and
    # refused; candidates never measured ranked below it
    rank = (chosen[0]["agreement"], chosen[0]["margin"])
    above = [e for e in sel.evidence if (e["agreement"], e["margin"]) > rank]
    assert all(e["clean_change"] is not None and e["clean_change"] > 0.01 for e in above)
    assert all((e["agreement"], e["margin"]) <= rank for e in sel.evidence if e["clean_change"] is None)
    measured = [e for e in sel.evidence if e["clean_change"] is not None]
    assert chosen[0]["agreement"] == max(e["agreement"] for e in measured if e["clean_change"] <= 0.01)
    assert "*" in sel.table() and sel.profile.info["selection"]["chosen"] == chosen[0]
    assert "folds" in sel.profile.info["selection"]["criterion"]
    assert all(e["twin_kl"] >= 0 for e in sel.evidence)  # both tie-breaks are in the evidence
    kl = fr.select(est, cx[:16], px[:16], modes=["clamp"], alphas=[0.5, 1.0], tie_break="twin_kl",
                   x_clean_reference=backdoored["hold_clean"])
    assert "ties: twin_kl (agreements within 1 sample(s)" in kl.profile.info["selection"]["criterion"]
    # the default slack: every candidate within one twin of the best qualifying agreement with a
    # smaller KL than the choice was measured and refused by the clean limit
    kl_chosen = kl.profile.info["selection"]["chosen"]
    top = max(round(16 * e["agreement"]) for e in kl.evidence
              if e["expected_drop"] is not None and e["expected_drop"] <= 0.01)
    assert round(16 * kl_chosen["agreement"]) >= top - 1
    assert all(e["expected_drop"] is not None and e["expected_drop"] > 0.01 for e in kl.evidence
               if round(16 * e["agreement"]) >= top - 1 and e["twin_kl"] < kl_chosen["twin_kl"])
    with pytest.raises(ValueError, match="tie_break"):
        fr.select(est, cx[:16], px[:16], tie_break="order")
    for bad in (-1, 0.5):
        with pytest.raises(ValueError, match="agreement_slack"):
            fr.select(est, cx[:16], px[:16], agreement_slack=bad)
    assert sel.profile.layer(sel.layers[0]).directions.shape[0] == 1
    assert not fr.repair_modules(model)  # selection leaves the model as it was
    assert all(st.n_pairs == 0 for st in est.stats.values())  # the caller's estimator is not changed
    assert _pa_with(model, sel.profile, backdoored) > 0.9


def test_selection_scores_out_of_fold(backdoored, monkeypatch):
    """Each fold's directions come from the other folds' pairs only (12 of 16 here); the final
    profile from all 16."""
    from fire_repair.selection import fold_splits

    folds = fold_splits(16, 4, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(16)) and all(len(f) == 4 for f in folds)
    with pytest.raises(ValueError, match="at least 2"):
        fold_splits(1, 4, seed=0)
    clones = []
    original = fr.Estimator.clone
    monkeypatch.setattr(fr.Estimator, "clone", lambda self: clones.append(original(self)) or clones[-1])
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"][:64], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    fr.select(est, cx[:16], px[:16], alphas=[1.0], folds=4)
    assert [c.stats["block2"].n_pairs for c in clones] == [12, 12, 12, 12, 16]


def test_selection_ties_go_to_the_margin_not_the_order():
    from fire_repair.selection import choose

    ev = [{"layers": ["a"], "mode": "clamp", "alpha": 1.0, "agreement": 1.0, "margin": 0.5, "clean_change": 0.0},
          {"layers": ["b"], "mode": "clamp", "alpha": 1.0, "agreement": 1.0, "margin": 3.0, "clean_change": 0.005},
          {"layers": ["c"], "mode": "clamp", "alpha": 1.0, "agreement": 1.0, "margin": 9.0, "clean_change": 0.5}]
    assert choose(ev, 0.01)["layers"] == ["b"]
    assert choose(ev, 0.0)["layers"] == ["a"]
    assert choose(ev, -1.0)["layers"] == ["a"]  # none allowed: the least disruptive


def test_twin_kl_tie_break_prefers_the_closest_restoration():
    from fire_repair.selection import choose, kl

    ev = [{"layers": ["a"], "agreement": 1.0, "margin": 9.0, "twin_kl": 0.8, "clean_change": 0.0},
          {"layers": ["b"], "agreement": 1.0, "margin": 3.0, "twin_kl": 0.1, "clean_change": 0.0},
          {"layers": ["c"], "agreement": 0.5, "margin": 1.0, "twin_kl": 0.0, "clean_change": 0.0}]
    assert choose(ev, 0.01)["layers"] == ["a"]
    assert choose(ev, 0.01, tie="twin_kl")["layers"] == ["b"]  # smaller wins; agreement still first
    p = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(kl(p, p), torch.zeros(2), atol=1e-7)
    q = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    ref = (p.softmax(1) * (p.log_softmax(1) - q.log_softmax(1))).sum(1)
    torch.testing.assert_close(kl(p, q), ref)


def test_agreements_closer_than_one_sample_are_ties_for_the_margin():
    from fire_repair.selection import choose

    ev = [{"layers": ["a"], "agreement": 0.8571, "margin": 1.7, "clean_change": 0.0},
          {"layers": ["b"], "agreement": 0.8567, "margin": 2.8, "clean_change": 0.0},
          {"layers": ["c"], "agreement": 0.8567 - 1 / 64, "margin": 9.0, "clean_change": 0.0}]
    assert choose(ev, 0.01)["layers"] == ["a"]  # exact comparison: the 0.0004 decides
    assert choose(ev, 0.01, n=64)["layers"] == ["b"]  # one sample's resolution: the margin decides
    assert choose(ev[::-1], 0.01, n=64)["layers"] == ["b"]


def test_agreements_within_the_slack_are_ordered_by_the_tie_break_alone():
    from fire_repair.selection import choose

    ev = [{"layers": ["a"], "agreement": 16 / 16, "twin_kl": 0.08, "clean_change": 0.0},
          {"layers": ["b"], "agreement": 15 / 16, "twin_kl": 0.05, "clean_change": 0.0},
          {"layers": ["c"], "agreement": 14 / 16, "twin_kl": 0.01, "clean_change": 0.0},
          {"layers": ["d"], "agreement": 15 / 16, "twin_kl": 0.02, "clean_change": 0.5}]
    assert choose(ev, 0.01, n=16, tie="twin_kl")["layers"] == ["a"]
    assert choose(ev, 0.01, n=16, tie="twin_kl", slack=1)["layers"] == ["b"]  # d costs too much
    assert choose(ev, 0.01, n=16, tie="twin_kl", slack=2)["layers"] == ["c"]
    # the slack counts from the best agreement that qualifies: without a, b's 15 is the best
    assert choose(ev[1:], 0.01, n=16, tie="twin_kl", slack=1)["layers"] == ["c"]
    assert choose([dict(e, clean_change=1.0) for e in ev], 0.01, n=16, tie="twin_kl", slack=1)["layers"] == ["a"]


def test_selection_measures_clean_change_lazily_with_the_same_choice():
    """Measuring clean_change only down the ranking until a candidate qualifies picks what
    measuring every candidate picks, for random evidence with ties."""
    from fire_repair.selection import choose

    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        ag = torch.randint(0, 3, (n,), generator=gen).float() / 2
        mg = torch.randint(0, 3, (n,), generator=gen).float()
        cc = torch.randint(0, 4, (n,), generator=gen).float() / 100
        full = [{"layers": [str(i)], "agreement": float(ag[i]), "margin": float(mg[i]), "clean_change": float(cc[i])}
                for i in range(n)]
        lazy = [dict(e, clean_change=None) for e in full]
        calls = []

        def measure(e, calls=calls, full=full):
            calls.append(e["layers"][0])
            e["clean_change"] = full[int(e["layers"][0])]["clean_change"]

        for limit in (0.0, 0.015, 0.03, -1.0):
            for e in lazy:
                e["clean_change"] = None
            calls.clear()
            for slack in (0, 1):
                for e in lazy:
                    e["clean_change"] = None
                calls.clear()
                got = choose(lazy, limit, measure, n=2, slack=slack)["layers"]
                assert got == choose(full, limit, n=2, slack=slack)["layers"], (trial, limit, slack)
                assert len(calls) == len(set(calls))  # each candidate measured at most once
                ok = [e for e in full if e["clean_change"] <= limit]
                if ok:  # by hand: within the slack of the best qualifying agreement, margin, then cost
                    top = max(round(2 * e["agreement"]) for e in ok)
                    near = [e for e in ok if round(2 * e["agreement"]) >= top - slack]
                    want = min(near, key=lambda e: (-e["margin"], e["clean_change"]))
                    assert (want["margin"], want["clean_change"]) == \
                        (full[int(got[0])]["margin"], full[int(got[0])]["clean_change"])


def test_selection_with_pairs_already_observed_warns(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    est.observe_pairs(cx[:8], px[:8])
    with pytest.warns(DeprecationWarning, match="already observed pairs"):
        fr.select(est, cx[:8], px[:8], alphas=[1.0])


def test_selection_refuses_empty_grids(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    cx, px = backdoored["hold_pairs"]
    for bad in ({"layer_sets": []}, {"alphas": ()}, {"modes": []}):
        with pytest.raises(ValueError, match="at least one"):
            fr.select(est, cx[:8], px[:8], **bad)


def test_unpaired_selection_needs_no_twins_and_no_labels(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block1", "block2", "block3"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    flagged = backdoored["hold_pairs"][1][:32]
    sel = fr.select_unpaired(est, flagged, backdoored["hold_clean"], alphas=[1.0])
    assert sel.profile.info["selection"]["inferred_target"] == backdoored["attack"].target
    assert sel.profile.info["selection"]["target_share"] > 0.9  # the backdoor shows
    assert len(sel.evidence) == 3
    assert _pa_with(model, sel.profile, backdoored) > 0.85
    # by default agreements within 2 flagged samples of the best are ties, and the candidate whose
    # repaired samples' mean margin lies closest to the clean reference's mean margin, plus half
    # its alpha, wins
    info = sel.profile.info["selection"]
    logits = fr.selection.logits(model, backdoored["hold_clean"])
    clean_margin = (logits.topk(2, 1).values[:, 0] - logits.topk(2, 1).values[:, 1]).mean().item()
    assert info["clean_margin"] == pytest.approx(clean_margin, rel=1e-5)
    assert "ties: margin_gap_alpha (agreements within 2 sample(s)" in info["criterion"]
    # over alphas: the tie-break weighs the gap against the alpha
    grid = fr.select_unpaired(est, flagged, backdoored["hold_clean"], alphas=[0.5, 1.0, 2.0, 3.0])
    top = max(round(32 * e["agreement"]) for e in grid.evidence)
    near = [e for e in grid.evidence if round(32 * e["agreement"]) >= top - 2]
    for e in grid.evidence:
        assert e["margin_gap"] == pytest.approx(abs(e["margin"] - clean_margin), rel=1e-5)
        assert e["margin_gap_alpha"] == pytest.approx(e["margin_gap"] + 0.5 * e["alpha"])
    chosen = grid.profile.info["selection"]["chosen"]
    assert chosen["margin_gap_alpha"] == min(e["margin_gap_alpha"] for e in near)
    # the pure gap, and a weight that lets alpha decide alone among the near-ties
    gap = fr.select_unpaired(est, flagged, backdoored["hold_clean"], alphas=[0.5, 1.0, 2.0, 3.0],
                             tie_break="margin_gap")
    assert gap.profile.info["selection"]["chosen"]["margin_gap"] == min(e["margin_gap"] for e in near)
    gentle = fr.select_unpaired(est, flagged, backdoored["hold_clean"], alphas=[0.5, 1.0, 2.0, 3.0],
                                alpha_weight=1e6)
    assert gentle.alpha == min(e["alpha"] for e in near)
    # the largest mean margin instead, and no slack
    margin = fr.select_unpaired(est, flagged, backdoored["hold_clean"], alphas=[1.0], agreement_slack=0,
                                tie_break="margin")
    best = max(round(32 * e["agreement"]) for e in margin.evidence)
    assert margin.profile.info["selection"]["chosen"]["margin"] == \
        max(e["margin"] for e in margin.evidence if round(32 * e["agreement"]) == best)
    with pytest.raises(ValueError, match="agreement_slack"):
        fr.select_unpaired(est, flagged, backdoored["hold_clean"], agreement_slack=-1)
    with pytest.raises(ValueError, match="tie_break"):
        fr.select_unpaired(est, flagged, backdoored["hold_clean"], tie_break="twin_kl")
    for bad in (-0.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="alpha_weight"):
            fr.select_unpaired(est, flagged, backdoored["hold_clean"], alpha_weight=bad)


def test_unpaired_selection_warns_where_the_flagged_samples_show_no_backdoor(backdoored):
    """Flagged samples the model reads as their own classes (an attack that did not implant,
    or samples that are not triggered) give "moved off the inferred target" nothing to measure."""
    model = backdoored["model"]
    est = fr.Estimator(model, ["block1"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    not_triggered = backdoored["hold_pairs"][0][:32]  # the twins: clean images of many classes
    with pytest.warns(UserWarning, match=r"flagged samples are predicted as the inferred target"):
        sel = fr.select_unpaired(est, not_triggered, backdoored["hold_clean"], alphas=[1.0])
    pred = predict(model, not_triggered)
    info = sel.profile.info["selection"]
    share = (pred == info["inferred_target"]).double().mean().item()
    assert info["target_share"] == pytest.approx(share) and share < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # triggered samples: no warning
        fr.select_unpaired(est, backdoored["hold_pairs"][1][:32], backdoored["hold_clean"], alphas=[1.0])


def test_select_refuses_pairs_of_different_sizes(backdoored):
    est = fr.Estimator(backdoored["model"], ["block2"])
    clean, poisoned = backdoored["hold_pairs"]
    with pytest.raises(ValueError, match="pairs must have equal shapes"):
        fr.select(est, clean[:8], poisoned[:6])


def test_a_candidate_that_cannot_be_estimated_is_reported_not_fatal(backdoored, monkeypatch):
    """Per position at a layer where no flagged position stands out, unpaired estimation raises;
    selection keeps that candidate's error in the evidence and chooses among the others, and
    raises only when no candidate can be estimated."""
    from fire_repair.stats import PositionStats

    def none_stands_out(self):
        raise ValueError("no poisoned position stands out from the clean positions: no direction to estimate")

    monkeypatch.setattr(PositionStats, "triggered", none_stands_out)
    model = backdoored["model"]
    flat = fr.Estimator(model, ["block2"])
    pos = fr.Estimator(model, ["block2"], per_position=True, channel_dim=1)
    for est in (flat, pos):
        est.observe(backdoored["hold_clean"], poisoned=False)
    flagged = backdoored["hold_pairs"][1][:32]
    sel = fr.select_unpaired([flat, pos], flagged, backdoored["hold_clean"], alphas=[1.0, 2.0])
    assert sel.form == "flattened"
    failed = [e for e in sel.evidence if "error" in e]
    assert [e["form"] for e in failed] == ["per_position"] * 2 and "stands out" in failed[0]["error"]
    assert "not estimable: no poisoned position" in sel.table()
    with pytest.raises(ValueError, match="no candidate could be estimated"):
        fr.select_unpaired(pos, flagged, backdoored["hold_clean"], alphas=[1.0])


def test_selection_limits_the_expected_accuracy_drop_on_clean_inputs(backdoored):
    """clean_cost="expected_drop": the limit applies to the accuracy the repair would cost if the
    unrepaired model's probabilities were calibrated, measured without labels."""
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2", "block3"])
    clean = backdoored["hold_clean"]
    est.observe(clean, poisoned=False)
    cx, px = backdoored["hold_pairs"]
    sel = fr.select(est, cx[:16], px[:16], modes=["clamp", "project"], alphas=[1.0, 3.0], tau_quantile=[0.5, 0.99],
                    x_clean_reference=clean, clean_cost="expected_drop", max_clean_change=0.002)
    chosen = sel.profile.info["selection"]["chosen"]
    assert "expected_drop <= 0.002" in sel.profile.info["selection"]["criterion"]
    measured = [e for e in sel.evidence if e["expected_drop"] is not None]
    assert chosen in measured
    for e in measured:  # each flip costs at most 1, so the expected drop never exceeds the share flipped
        assert 0.0 <= e["expected_drop"] <= e["clean_change"] + 1e-9
    # recomputed by hand for the chosen repair
    from fire_repair.selection import logits
    p0 = torch.softmax(logits(model, clean), 1)
    y0 = p0.argmax(1)
    fr.attach(model, sel.profile)
    try:
        y1 = logits(model, clean).argmax(1)
    finally:
        fr.detach(model)
    expect = (p0.gather(1, y0[:, None]) - p0.gather(1, y1[:, None])).mean().item()
    assert chosen["expected_drop"] == pytest.approx(expect, abs=1e-6)
    assert chosen["clean_change"] == pytest.approx((y1 != y0).float().mean().item())
    if chosen["expected_drop"] > 0.002:  # only when nothing qualifies: then every candidate costs more
        assert all(e["expected_drop"] > 0.002 for e in measured)
    with pytest.raises(ValueError, match="clean_cost"):
        fr.select(est, cx[:16], px[:16], alphas=[1.0], clean_cost="accuracy")


def test_choose_limits_the_named_clean_cost():
    from fire_repair.selection import choose
    ev = [{"layers": ["a"], "agreement": 1.0, "margin": 1.0, "clean_change": 0.05, "expected_drop": 0.001},
          {"layers": ["b"], "agreement": 0.5, "margin": 1.0, "clean_change": 0.0, "expected_drop": 0.0}]
    assert choose(ev, 0.01)["layers"] == ["b"]
    assert choose(ev, 0.01, cost="expected_drop")["layers"] == ["a"]
