"""The field's metrics (BackdoorBench conventions).

- CA: accuracy on clean test inputs;
- ASR: fraction of triggered inputs (true label != target) classified as the target;
- PA: fraction of those triggered inputs classified as their true label (recovery);
- a rejected input (prediction -1, from a detect-and-reject defense) counts as neither correct
  nor the target; the rejection rates are reported beside.
"""
import torch

from fire_repair import predict  # noqa: F401  (re-exported for the harness)


def rates(pred_clean, y_clean, pred_poison, y_true, target: int) -> dict:
    return {
        "CA": (pred_clean == y_clean).float().mean().item(),
        "ASR": (pred_poison == target).float().mean().item(),
        "PA": (pred_poison == y_true).float().mean().item(),
        "reject_clean": (pred_clean < 0).float().mean().item(),
        "reject_poison": (pred_poison < 0).float().mean().item(),
    }


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([pos, neg])
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, averaged over ties
    r_pos = ranks[: pos.numel()].sum()
    n_pos, n_neg = pos.numel(), neg.numel()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

