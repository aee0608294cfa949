"""Label-free choice of the layer(s), mode and alpha.

On held-out pairs (x_clean, x_poisoned), each candidate repair is scored by
- `agreement`: how often the repaired model's prediction on x_poisoned equals the unrepaired
  model's own prediction on the clean twin (no labels needed), and
- `clean_change`: how often the repair changes the prediction on x_clean.
The chosen candidate has the highest agreement among those with clean_change <= max_clean_change
(ties: the first candidate tried, in the order layer sets, modes, alphas as given). Every
candidate's evidence is returned.
"""
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attach import attach, detach
from .estimate import Estimator


@dataclass
class Selection:
    profile: object
    layers: list
    mode: str
    alpha: float
    evidence: list = field(default_factory=list)  # one dict per candidate

    def table(self) -> str:
        lines = ["layers | mode | alpha | agreement | clean_change"]
        for e in self.evidence:
            mark = " *" if (e["layers"], e["mode"], e["alpha"]) == (self.layers, self.mode, self.alpha) else ""
            lines.append(f"{'+'.join(e['layers'])} | {e['mode']} | {e['alpha']:g} | {e['agreement']:.3f} | "
                         f"{e['clean_change']:.3f}{mark}")
        return "\n".join(lines)


@torch.no_grad()
def _predict(model, x, batch=256):
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def select(model: torch.nn.Module, estimator: Estimator, x_clean: torch.Tensor, x_poisoned: torch.Tensor,
           layer_sets: Sequence[Sequence[str]] = None, modes: Sequence[str] = ("clamp",),
           alphas: Sequence[float] = (0.5, 1.0, 1.5, 2.0), max_clean_change: float = 0.01,
           tau_quantile: float = 0.99, source: str = "auto") -> Selection:
    if layer_sets is None:
        layer_sets = [[name] for name in estimator.layers]
    reference = _predict(model, x_clean)
    evidence, best = [], None
    for layers in layer_sets:
        for mode in modes:
            for alpha in alphas:
                profile = estimator.profile(mode=mode, alpha=alpha, tau_quantile=tau_quantile, source=source,
                                            layers=list(layers), with_fingerprint=False)
                attach(model, profile)
                try:
                    agreement = (_predict(model, x_poisoned) == reference).float().mean().item()
                    clean_change = (_predict(model, x_clean) != reference).float().mean().item()
                finally:
                    detach(model)
                e = {"layers": list(layers), "mode": mode, "alpha": float(alpha), "agreement": agreement,
                     "clean_change": clean_change}
                evidence.append(e)
                if clean_change <= max_clean_change and (best is None or agreement > best["agreement"]):
                    best = e
    # nothing keeps clean predictions: take the least disruptive candidate
    e = best or min(evidence, key=lambda e: (e["clean_change"], -e["agreement"]))
    profile = estimator.profile(mode=e["mode"], alpha=e["alpha"], tau_quantile=tau_quantile, source=source,
                                layers=e["layers"])  # the chosen one, with the model's fingerprint
    profile.info["selection"] = {"criterion": "max agreement s.t. clean_change <= %g" % max_clean_change,
                                 "chosen": e, "candidates": evidence}
    return Selection(profile=profile, layers=e["layers"], mode=e["mode"], alpha=e["alpha"], evidence=evidence)
