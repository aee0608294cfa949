"""Detection for free: the fused op's projection scores as a per-sample backdoor score."""
import torch

from .attach import repair_modules


@torch.no_grad()
def scores(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> dict:
    """{layer: (N,) score} for a model with attached repairs: the largest projection onto the
    trigger directions, in units of the clean projections' std (higher: more likely poisoned).
    Computed in the same forward pass as the repair."""
    modules = repair_modules(model)
    if not modules:
        raise RuntimeError("no repair is attached to this model (fire_repair.attach first)")
    saved = {name: m.record_scores for name, m in modules.items()}
    out = {name: [] for name in modules}
    try:
        for m in modules.values():
            m.record_scores = True
        model.eval()
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
            for name, m in modules.items():
                out[name].append(m.backdoor_score(m.last_scores))
    finally:
        for name, m in modules.items():
            m.record_scores = saved[name]
            m.last_scores = m.last_input = None
    return {name: torch.cat(v) if v else torch.zeros(0) for name, v in out.items()}
