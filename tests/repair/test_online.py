"""`fire_repair.online`: the streaming repair, with the caller's flags or its own detector."""
import pytest
import torch

import fire_repair as fr
from fire_eval.metrics import predict


def _pa(model, b):
    return (predict(model, b["eval_poison"]) == b["eval_poison_y"]).float().mean().item()


def test_online_with_caller_flags_raises_poisoned_accuracy(backdoored):
    model = backdoored["model"]
    est = fr.Estimator(model, ["block2"])
    est.observe(backdoored["hold_clean"], poisoned=False)
    online = fr.Online(est, mode="clamp", threshold=None)
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
    online = fr.Online(est, mode="clamp", threshold=3.0)
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


@pytest.mark.parametrize("flags", [[True, False, True, False], "numpy", True])
def test_online_step_takes_flags_as_the_estimator_does(flags):
    import numpy as np
    from helpers import identity_model, planted

    clean, poisoned, _ = planted(n=40)
    model = identity_model()
    est = fr.Estimator(model, ["feat"])
    est.observe(clean, poisoned=False)
    online = fr.Online(est, mode="clamp", threshold=None)
    try:
        if flags == "numpy":
            flags = np.array([True, False, True, False])
        _, used = online.step(poisoned[:4], poisoned=flags)
        assert used.dtype == torch.bool and used.shape == (4,)
        assert online.seen_poisoned == int(used.sum()) > 0
        with pytest.raises(ValueError, match="one flag per sample"):
            online.step(poisoned[:4], poisoned=[True] * 3)
        with pytest.raises(ValueError, match="booleans"):
            online.step(poisoned[:4], poisoned=torch.rand(4))
    finally:
        online.close()
