"""Why FIRE holds or fails at a layer: how much of a trigger's displacement a few directions carry,
and whether a gate calibrated on clean images can see it there.

FIRE assumes a trigger moves a sample's features along a few repeatable directions. At each
layer, `trigger_spectrum` measures that assumption on triggered images and their clean twins:

- `share@k`: the share of the displacements' energy (sum over pairs of |h(x + trigger) - h(x)|^2)
  in their top k principal directions (uncentered). Near 1 at k = 1: one direction carries the
  trigger; spread over many k: no few directions do.
- `amplitude`: the mean squared displacement against the clean features' total variance.
- `reach@k`: the share of triggered images whose largest |z| along the top k directions (z in
  units of the clean images' std along each, about the clean mean) is above the clean images'
  0.99 quantile of the same statistic: what a gate calibrated on clean images can flag there.

Per position (`per_position=True`, outputs (N, C, ...) or tokens (N, T, C) with `channel_dim=-1`),
each position's C features are one row, as the per-position repair reads them, and an image's
statistic for reach is its largest over positions.
"""
import torch

from .inference import eval_mode
from .outputs import hidden_state


def _features(model, layers, x, batch: int) -> dict:
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing}")
    out = {name: [] for name in layers}

    def hook(name):
        def record(mod, inp, o):
            out[name].append(hidden_state(o, name).detach().float().cpu())
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        with eval_mode(model), torch.no_grad():
            for i in range(0, x.shape[0], batch):
                model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}


def _rows(h: torch.Tensor, per_position: bool, channel_dim: int):
    """(rows, positions per image): the feature vectors FIRE's form reads."""
    if not per_position:
        return h.reshape(h.shape[0], -1), 1
    if h.dim() < 3:
        raise ValueError(f"per_position needs outputs with positions, got shape {tuple(h.shape)}")
    c = h.movedim(channel_dim, -1)
    return c.reshape(-1, c.shape[-1]), c[0].numel() // c.shape[-1]


def _largest_z(rows, mean, v, sd, per: int) -> torch.Tensor:
    """Each image's largest |z| over the directions `v` and its `per` positions."""
    return ((rows - mean) @ v / sd).abs().amax(1).reshape(-1, per).amax(1)


@torch.no_grad()
def trigger_spectrum(model: torch.nn.Module, layers: list, x_triggered: torch.Tensor, x_twins: torch.Tensor,
                     x_clean: torch.Tensor, ks=(1, 2, 4, 8), per_position: bool = False, channel_dim: int = 1,
                     quantile: float = 0.99, batch: int = 256) -> list:
    """One dict per layer: `layer`, `dim` (features per row), `amplitude`, `share@k` and
    `reach@k` for each k in `ks` (see the module's docstring). `x_triggered[i]` is `x_twins[i]`
    with the trigger; `x_clean` are other clean images (the gate's calibration). Needs at least
    two pairs and two clean images; a k above the rank available is clipped to it."""
    if x_triggered.shape != x_twins.shape:
        raise ValueError(f"x_triggered and x_twins must pair up, got {tuple(x_triggered.shape)} and "
                         f"{tuple(x_twins.shape)}")
    if x_triggered.shape[0] < 2 or x_clean.shape[0] < 2:
        raise ValueError("trigger_spectrum needs at least two pairs and two clean images")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    layers = list(layers)
    trig, twin, clean = (_features(model, layers, x, batch) for x in (x_triggered, x_twins, x_clean))
    out = []
    for name in layers:
        (t, per), (w, _), (c, _) = (_rows(f[name].double(), per_position, channel_dim)
                                    for f in (trig, twin, clean))
        d = t - w
        energy = d.pow(2).sum()
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        mean, var = c.mean(0), c.var(0).sum()
        row = {"layer": name, "dim": int(d.shape[1]),
               "amplitude": float(energy / d.shape[0] / var.clamp_min(1e-300))}
        for k in ks:
            kk = min(int(k), vh.shape[0])
            v = vh[:kk].T  # (dim, kk): the top displacement directions
            row[f"share@{k}"] = float(s[:kk].pow(2).sum() / energy.clamp_min(1e-300))
            sd = ((c - mean) @ v).std(0).clamp_min(1e-12)
            gate = torch.quantile(_largest_z(c, mean, v, sd, per), quantile)
            row[f"reach@{k}"] = float((_largest_z(t, mean, v, sd, per) > gate).double().mean())
        out.append(row)
    return out
