"""The model's input as a layer FIRE can repair.

FIRE repairs the outputs of named modules. A trigger that blends into the image or stamps a
patch on it is often best undone at the pixels, before the first layer mixes it with the
content (docs/method.md#candidate-layers). `with_input_layer(model)` puts an identity named
`input` in front of the model, so that the pixels are a layer like any other: `fr.fit` and
`fr.candidate_layers` offer it, and a profile, `attach` and `fr.export` treat it as any layer.
"""
import torch


class WithInputLayer(torch.nn.Module):
    """`model` behind an identity named `input`. The wrapped model is `.model` (its state dict
    keys gain the prefix `model.`); other attribute reads fall through to it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        if isinstance(model, WithInputLayer):
            raise ValueError("the model already has an input layer")
        self.input = torch.nn.Identity()
        self.model = model

    def forward(self, x, *args, **kwargs):
        return self.model(self.input(x), *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def with_input_layer(model: torch.nn.Module) -> WithInputLayer:
    """`model` with its input exposed as a layer named `input` (see the module docstring). The
    model is not copied: the wrapper holds it, in the mode it is in."""
    out = WithInputLayer(model)
    out.train(model.training)
    return out
