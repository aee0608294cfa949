"""What FIRE reads and repairs in a layer's output.

A layer returns a tensor (conv stages, linear layers), a tuple whose first element is the
hidden state (Hugging Face transformer blocks, `nn.LSTM`, `nn.MultiheadAttention`), or a
Hugging Face `ModelOutput` whose first field is. FIRE repairs that tensor and passes the rest
of the output through unchanged. Any other output is refused with an error naming the layer.
"""
from collections.abc import Mapping

import torch


def _is_model_output(out) -> bool:
    # transformers' ModelOutput, recognised without importing transformers
    return isinstance(out, Mapping) and hasattr(out, "to_tuple")


def hidden_state(out, layer: str) -> torch.Tensor:
    """The tensor FIRE reads and repairs in `out`, the output of the layer named `layer`."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if _is_model_output(out) and len(out) and isinstance(next(iter(out.values())), torch.Tensor):
        return next(iter(out.values()))
    raise TypeError(f"layer {layer!r} returns {type(out).__name__}: FIRE repairs a tensor, a tuple or list whose first "
                    "element is a tensor, or a ModelOutput whose first field is one; name a layer that returns one")


def with_hidden_state(out, h: torch.Tensor):
    """`out` with its hidden state (see `hidden_state`) replaced by `h`, everything else as it was."""
    if isinstance(out, torch.Tensor):
        return h
    if isinstance(out, list):
        return [h, *out[1:]]
    if isinstance(out, tuple):
        return type(out)(h, *out[1:]) if hasattr(out, "_fields") else (h, *out[1:])
    first = next(iter(out.keys()))
    return type(out)(**{**dict(out.items()), first: h})
