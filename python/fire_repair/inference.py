"""Running a model without changing it: eval mode for the duration, then the caller's mode back."""
import contextlib

import torch

from .outputs import hidden_state


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Puts `model` in eval mode inside the block and restores its training flag after (every
    module's: a model may mix them), so the library never moves BatchNorm statistics or runs
    dropout on the model it serves."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


def output_logits(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or the first tensor of a tuple or
    ModelOutput (Hugging Face classifiers return `ImageClassifierOutput(logits=...)`)."""
    return hidden_state(out, "the model's output")


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The model's outputs on x in eval mode, fp32 on the CPU, `batch` rows at a time (empty x
    gives a (0, 0) tensor)."""
    if x.shape[0] == 0:
        return torch.zeros(0, 0)
    with eval_mode(model):
        return torch.cat([output_logits(model(x[i:i + batch])).float().cpu() for i in range(0, x.shape[0], batch)])


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Predicted labels (int64) in eval mode; empty x gives an empty tensor."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    return logits(model, x, batch).argmax(1)
