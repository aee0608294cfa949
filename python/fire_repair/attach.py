"""Insertion of the repair into a model: `attach` and `detach`.

Each named layer gets a child `RepairModule` (registered as `<layer>.fire_repair`, so its
buffers are in `state_dict`, follow `.to()` / `.half()`, and are seen by `torch.compile` and
`torch.export`) and a forward hook that passes the layer's output through it. `detach`
removes both, leaving the model's modules, parameters and outputs exactly as before.
"""
from typing import Optional

import torch

from .profile import LayerRepair, Profile

CHILD = "fire_repair"


class RepairModule(torch.nn.Module):
    """Applies `torch.ops.fire.repair` to its input with the tensors of one profile layer."""

    def __init__(self, layer: LayerRepair, record_scores: bool = False):
        super().__init__()
        self.layer_name, self.mode = layer.name, layer.mode
        self.register_buffer("directions", layer.directions.detach().clone())
        self.register_buffer("alpha", layer.alpha.detach().clone())
        self.register_buffer("center", layer.center.detach().clone())
        self.register_buffer("tau", None if layer.tau is None else layer.tau.detach().clone())
        scale = layer.score_scale if layer.score_scale is not None else torch.ones(layer.k)
        self.register_buffer("score_scale", scale.detach().clone())
        self.enabled = True
        self.record_scores = record_scores  # eager monitoring: keeps the last scores and input
        self.last_scores: Optional[torch.Tensor] = None
        self.last_input: Optional[torch.Tensor] = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        if self.record_scores:
            self.last_input = h.detach()
            out, scores = torch.ops.fire.repair_with_scores(h, self.directions, self.alpha, self.center, self.tau,
                                                            self.mode)
            self.last_scores = scores.detach()
            return out
        return torch.ops.fire.repair(h, self.directions, self.alpha, self.center, self.tau, self.mode)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sample backdoor score: the largest projection in units of its clean std."""
        _, c = torch.ops.fire.repair_with_scores(h, self.directions, self.alpha, self.center, self.tau, self.mode)
        return (c / self.score_scale.float()).amax(dim=1)

    @torch.no_grad()
    def load_layer(self, layer: LayerRepair) -> None:
        """Updates the buffers in place (same tensors: compiled graphs and CUDA graphs stay valid)."""
        if layer.mode != self.mode or layer.directions.shape != self.directions.shape:
            raise ValueError(f"layer {layer.name!r}: cannot update in place from mode {layer.mode}, "
                             f"shape {tuple(layer.directions.shape)}")
        self.directions.copy_(layer.directions)
        self.alpha.copy_(layer.alpha)
        self.center.copy_(layer.center)
        if self.tau is not None:
            self.tau.copy_(layer.tau)
        if layer.score_scale is not None:
            self.score_scale.copy_(layer.score_scale)

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, mode={self.mode!r}, k={self.directions.shape[0]}"


def _hook(module, inputs, output):
    return getattr(module, CHILD)(output)


def attach(model: torch.nn.Module, profile: Profile, check_fingerprint: bool = True,
           record_scores: bool = False) -> torch.nn.Module:
    """Puts a RepairModule after each layer of the profile. Returns the same model object."""
    profile.check(model, check_fingerprint=check_fingerprint)
    modules = dict(model.named_modules())
    already = [name for name in profile.layer_names if hasattr(modules[name], CHILD)]
    if already:
        raise RuntimeError(f"layer(s) {already} are already repaired; call fire_repair.detach(model) first")
    ref = next(iter(model.parameters()), None)
    for layer in profile.layers:
        target = modules[layer.name]
        repair = RepairModule(layer, record_scores=record_scores)
        if ref is not None:
            repair.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
        target.add_module(CHILD, repair)
        target._fire_hook = target.register_forward_hook(_hook)
    return model


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Removes every repair attached to the model (a no-op on a model without one)."""
    for module in list(model.modules()):
        if isinstance(getattr(module, CHILD, None), RepairModule):
            module._fire_hook.remove()
            del module._fire_hook
            delattr(module, CHILD)
    return model


def repair_modules(model: torch.nn.Module) -> dict:
    """{layer name: RepairModule} of an attached model."""
    return {name: getattr(m, CHILD) for name, m in model.named_modules() if isinstance(getattr(m, CHILD, None), RepairModule)}
