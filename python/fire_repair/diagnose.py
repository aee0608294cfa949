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
  A direction along which the clean images do not vary at all (a colour axis of grey images)
  flags any displacement along it.

Per position (`per_position=True`, outputs (N, C, ...) or tokens (N, T, C) with `channel_dim=-1`),
each position's C features are one row, as the per-position repair reads them, and an image's
statistic for reach is its largest over positions. A layer already repaired (`attach`) is read
before its repair, as the estimator reads it. No trigger (zero displacement) or clean features
that do not vary give NaN, not a number that looks measured.
"""
import torch

from ._op.validate import channel_dim_of
from .attachment import RepairWrapper
from .inference import eval_mode
from .outputs import hidden_state


def _device(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _rows(h: torch.Tensor, per_position: bool, channel_dim: int) -> torch.Tensor:
    """A layer output as the rows FIRE's form reads: (N, D) flattened, (N, P, C) per position."""
    h = h.detach().cpu()
    if not per_position:
        return h.reshape(h.shape[0], -1)
    if h.dim() < 3:
        raise ValueError(f"per_position needs outputs with positions, got shape {tuple(h.shape)}")
    hm = h.movedim(channel_dim_of(h, channel_dim), -1)
    return hm.reshape(h.shape[0], -1, hm.shape[-1])


def _capture(model, layers, x, batch, per_position, channel_dim) -> dict:
    """{layer: [rows of each batch]}: each layer's own output (the last call per forward)."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing}")
    seen, out = {}, {name: [] for name in layers}

    def hook(name):
        def record(mod, inp, o):
            seen[name] = hidden_state(o, name)
        return record

    handles = [(m.layer if isinstance(m, RepairWrapper) else m).register_forward_hook(hook(name))
               for name, m in ((n, modules[n]) for n in layers)]
    device = _device(model)
    try:
        with eval_mode(model), torch.no_grad():
            for i in range(0, x.shape[0], batch):
                seen.clear()
                model(x[i:i + batch].to(device))
                for name in layers:
                    if name not in seen:
                        raise RuntimeError(f"layer {name!r} did not run in the forward pass")
                    out[name].append(_rows(seen[name], per_position, channel_dim))
    finally:
        for h in handles:
            h.remove()
    return out


def _stack(batches) -> torch.Tensor:
    return torch.cat([b.reshape(-1, b.shape[-1]) for b in batches]).double()


def _top_directions(d: torch.Tensor, k: int):
    """(energies, (dim, k) directions) of the top k uncentered principal directions of rows d."""
    if d.shape[0] > d.shape[1]:  # the (dim, dim) Gram is the smaller problem
        e, v = torch.linalg.eigh(d.T @ d)
        return e.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    return s[:k].pow(2), vh[:k].T


def _largest_z(batches, mean, v, sd) -> torch.Tensor:
    """Each image's largest |z| over the directions `v` (and over its positions)."""
    out = []
    for rows in batches:
        z = ((rows.double() - mean) @ v / sd).abs()
        out.append(z.reshape(rows.shape[0], -1).amax(1))
    return torch.cat(out)


@torch.no_grad()
def trigger_spectrum(model: torch.nn.Module, layers: list, x_triggered: torch.Tensor, x_twins: torch.Tensor,
                     x_clean: torch.Tensor, ks=(1, 2, 4, 8), per_position: bool = False, channel_dim: int = 1,
                     quantile: float = 0.99, batch: int = 256) -> list:
    """One dict per layer: `layer`, `dim` (features per row), `amplitude`, `share@k` and
    `reach@k` for each k in `ks` (see the module's docstring). `x_triggered[i]` is `x_twins[i]`
    with the trigger; `x_clean` are other clean images (the gate's calibration; they must give the
    layer the same features per row, and per position may have other positions). `channel_dim`
    (per position): the channel dim of the layer's output, 1 for (N, C, ...), -1 for (N, T, C).
    Needs at least two pairs and two clean images; a k above the rank available is clipped to it.
    Inputs are moved to the model's device; the statistics are computed in fp64 on the CPU."""
    if x_triggered.shape != x_twins.shape:
        raise ValueError(f"x_triggered and x_twins must pair up, got {tuple(x_triggered.shape)} and "
                         f"{tuple(x_twins.shape)}")
    if x_triggered.shape[0] < 2 or x_clean.shape[0] < 2:
        raise ValueError("trigger_spectrum needs at least two pairs and two clean images")
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks}")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    layers = list(layers)
    trig, twin, clean = (_capture(model, layers, x, batch, per_position, channel_dim)
                         for x in (x_triggered, x_twins, x_clean))
    out = []
    for name in layers:
        t, c = _stack(trig[name]), _stack(clean[name])
        if c.shape[1] != t.shape[1]:
            raise ValueError(f"layer {name!r}: the clean images give {c.shape[1]} features per row, the triggered "
                             f"images {t.shape[1]}")
        d = t - _stack(twin[name])
        energy, mean, var = d.pow(2).sum(), c.mean(0), c.var(0).sum()
        flat = not bool(var > 0)
        none = not bool(energy > 1e-24 * var * d.shape[0])  # no displacement, to rounding
        row = {"layer": name, "dim": int(d.shape[1]),
               "amplitude": float("nan") if flat else float(energy / d.shape[0] / var)}
        e, v_all = _top_directions(d, max(ks))
        floor = 1e-6 * (var / d.shape[1]).sqrt()  # a clean std this small counts as no variation
        sd_all = ((c - mean) @ v_all).std(0).clamp_min(floor)
        for k in ks:
            kk = min(k, v_all.shape[1])
            v, sd = v_all[:, :kk], sd_all[:kk]
            row[f"share@{k}"] = float("nan") if none else float((e[:kk].sum() / energy).clamp(0, 1))
            if none or flat:
                row[f"reach@{k}"] = float("nan")
                continue
            gate = torch.quantile(_largest_z(clean[name], mean, v, sd), quantile)
            row[f"reach@{k}"] = float((_largest_z(trig[name], mean, v, sd) > gate).double().mean())
        out.append(row)
    return out
