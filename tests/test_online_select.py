"""Online repair and the label-free layer/alpha selection on the trained backdoored model."""
import torch

import fire_repair as fr
from fire_repair.eval.metrics import predict


def _pa(model, b):
    return (predict(model, b["eval_poison"]) == b["eval_poison_y"]).float().mean().item()


def test_online_with_caller_flags_raises_poisoned_accuracy(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    online = fr.Online(model, est, mode="clamp", threshold=None)
    try:
        start = _pa(model, backdoored)  # nothing poisoned seen yet: no repair
        stream = backdoored["hold_pairs"][1][:64]
        curve = []
        for i in range(0, 64, 8):
            online.step(stream[i:i + 8], poisoned=torch.ones(8, dtype=torch.bool))
            curve.append(_pa(model, backdoored))
        assert online.seen_poisoned == 64
        # unpaired estimates from a few samples are noisy (about +-5 points here): judge the tail
        assert start < 0.1 and sum(curve[-4:]) / 4 > 0.85, curve
    finally:
        online.close()


def test_online_detector_flags_without_labels(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    est.observe(backdoored["hold_pairs"][1][:2], poisoned=True)  # two known poisoned samples to start
    online = fr.Online(model, est, mode="clamp", threshold=3.0)
    try:
        mixed = torch.cat([backdoored["hold_pairs"][1][2:34], backdoored["hold_clean"][:32]])
        flagged = []
        for i in range(0, 64, 8):
            _, flags = online.step(mixed[i:i + 8])
            flagged.append(flags)
        flags = torch.cat(flagged)
        assert flags[:32].float().mean() > 0.9 and flags[32:].float().mean() < 0.1
        assert _pa(model, backdoored) > 0.9
    finally:
        online.close()


def test_selection_is_label_free_and_reports_evidence(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block1", "block2", "block3", "fc"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    est.observe_pairs(*backdoored["hold_pairs"])
    cx, px = backdoored["hold_pairs"]
    sel = fr.select(model, est, cx, px, modes=["clamp", "project"], alphas=[0.5, 1.0])
    assert len(sel.evidence) == 4 * 2 * 2
    chosen = [e for e in sel.evidence if (e["layers"], e["mode"], e["alpha"]) == (sel.layers, sel.mode, sel.alpha)]
    assert chosen and chosen[0]["clean_change"] <= 0.01
    assert chosen[0]["agreement"] == max(e["agreement"] for e in sel.evidence if e["clean_change"] <= 0.01)
    assert "*" in sel.table() and sel.profile.info["selection"]["chosen"] == chosen[0]
    assert not fr.repair_modules(model)  # selection leaves the model as it was
