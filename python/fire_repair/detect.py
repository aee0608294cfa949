"""Detection for free: the fused op's projection scores as a per-sample backdoor score."""
import torch

from .attachment import capture
from .inference import eval_mode


@torch.no_grad()
def backdoor_scores(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> dict:
    """{layer: (N,) score} for a model with attached repairs: the largest projection onto the
    trigger directions, in units of the clean projections' std (higher: more likely poisoned).
    Computed in the same forward pass as the repair; the model's training flag is restored."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out: dict = {}
    with eval_mode(model), capture(model) as cap:
        out = {name: [] for name in cap.modules}
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
            for name in out:
                out[name].append(cap.score(name))
    return {name: torch.cat(v) if v else torch.zeros(0) for name, v in out.items()}

