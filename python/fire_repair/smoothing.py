"""Gated input smoothing: FIRE's per-position detector says where a trigger sits in the image,
and only those pixels are blurred before the repaired model runs.

A trigger that replaces pixels (a patch, moving or not) also hides the content under it, and its
sharp pattern keeps acting at the layers before the repaired one. A blur of the whole image
softens the pattern but costs clean accuracy wherever fine detail matters (CIFAR-10: CA 79.2 ->
51.2%). Blurring only the positions whose score at a per-position repaired layer exceeds a clean
quantile costs almost nothing on clean images (a share of 0.0003 of their pixels at the
0.9999 quantile) and removes the pattern where it is. Evidence:
docs/method.md#gated-smoothing.

`Smoothing` is part of a `Profile` (saved with it), and `attach` applies it: a forward pre-hook
on the model runs the repaired model once to read the scores, then the model runs on the
smoothed input. The first pass doubles the forward cost; `fr.fit` offers smoothing only where
it helps by the label-free criterion (`FitConfig.smoothing`).
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MAX_WINDOW = 31  # the largest blur window and dilation a profile may ask for


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class Smoothing:
    """Blur the model's input (N, C, H, W) where the per-position backdoor score at `layer` (a
    per-position layer of the profile, with positions (H', W')) exceeds `gate`, in clean standard
    deviations (calibrated as the clean positions' `quantile`). A flagged position's footprint
    (its share of the input grid, H / H' x W / W' pixels) is dilated by `dilate` pixels and
    replaced by a Gaussian blur of `sigma` over a `size` x `size` window."""
    layer: str
    gate: float
    quantile: float
    sigma: float = 1.0
    size: int = 5
    dilate: int = 1

    def __post_init__(self):
        problems = []
        if not isinstance(self.layer, str) or not self.layer:
            problems.append(f"layer must be a layer name, got {self.layer!r}")
        for name in ("gate", "quantile", "sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                problems.append(f"{name} must be a finite number, got {v!r}")
        for name in ("size", "dilate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"{name} must be an int, got {v!r}")
        if not problems:
            if not 0 < self.quantile < 1:
                problems.append(f"quantile must be in (0, 1), got {self.quantile}")
            if self.sigma <= 0:
                problems.append(f"sigma must be > 0, got {self.sigma}")
            if not 1 <= self.size <= MAX_WINDOW or self.size % 2 == 0:
                problems.append(f"size must be an odd int in [1, {MAX_WINDOW}], got {self.size}")
            if not 0 <= self.dilate <= MAX_WINDOW:
                problems.append(f"dilate must be in [0, {MAX_WINDOW}], got {self.dilate}")
        if problems:
            raise ValueError("Smoothing: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Smoothing":
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise ValueError(f"smoothing must be a JSON object with {sorted(cls.__dataclass_fields__)}, got {d!r}")
        return cls(**d)


def gaussian_blur(x: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Each channel of x (N, C, H, W) convolved with a normalised size x size Gaussian of `sigma`
    (reflect padding where the image is large enough, else replicate)."""
    r = torch.arange(size, dtype=torch.float32, device=x.device) - size // 2
    k1 = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).to(x.dtype).expand(x.shape[1], 1, size, size)
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(x, [pad] * 4, mode=mode), k, groups=x.shape[1])


def position_scores(repair, h: torch.Tensor) -> torch.Tensor:
    """(N, *positions): the largest projection over directions at each position of h, the
    output of the per-position layer that `repair` (a RepairModule) repairs, in clean stds."""
    _, c = torch.ops.fire.repair_with_scores(h, repair.directions, repair.alpha, repair.center, repair.tau,
                                             repair.mode, repair.channel_dim, repair.slope)
    return (c / repair.score_scale.to(c.dtype)).amax(-1)


def flagged_pixels(scores: torch.Tensor, gate: float, size, dilate: int) -> torch.Tensor:
    """(N, 1, H, W) bool: the input pixels under positions whose score exceeds `gate`, dilated
    by `dilate`. scores: (N, H', W')."""
    if scores.dim() != 3:
        raise ValueError(f"smoothing needs a layer with two position dims (N, C, H', W'), got scores of shape "
                         f"{tuple(scores.shape)}")
    mask = F.interpolate((scores > gate).to(torch.float32)[:, None], size=tuple(size), mode="nearest")
    if dilate:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask > 0


def smooth(x: torch.Tensor, scores: torch.Tensor, smoothing: Smoothing) -> torch.Tensor:
    """x with the flagged pixels (`flagged_pixels`) replaced by their Gaussian blur."""
    mask = flagged_pixels(scores, smoothing.gate, x.shape[-2:], smoothing.dilate)
    return torch.where(mask, gaussian_blur(x, smoothing.sigma, smoothing.size), x)


class SmoothingHook:
    """The forward pre-hook `attach` puts on the model for a profile with smoothing: a first,
    inner forward pass reads the scores at the smoothing layer (the call's other arguments
    passed through), then the model's own pass runs on the smoothed input."""

    def __init__(self, model: torch.nn.Module, repair, smoothing: Smoothing):
        self.repair, self.smoothing = repair, smoothing
        self._inner = False
        self._scores: Optional[torch.Tensor] = None
        # registered once (not per call: a compiled model would meet a different hook each time);
        # prepended, so that a pre-hook the user put on the model runs once, on the smoothed input
        self.grab = repair.register_forward_hook(self._grab)
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True, prepend=True)

    def _grab(self, module, args, out):
        if self._inner:
            self._scores = position_scores(self.repair, args[0])

    def __call__(self, model, args, kwargs):
        if self._inner:
            return None
        return self.smoothed_args(model, args, kwargs)

    def smoothed_args(self, model, args, kwargs) -> tuple:
        """(args, kwargs) of the call with the first argument, the images, smoothed. The scores
        come from an inner pass without gradients (it only reads them)."""
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
            raise ValueError("a profile with smoothing needs the model's first positional argument to be images "
                             "(N, C, H, W)")
        inner, self._inner = self._inner, True
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            self._inner = inner
        scores, self._scores = self._scores, None
        if scores is None:
            raise RuntimeError(f"the smoothing layer {self.smoothing.layer!r} did not run in the model's forward")
        return (smooth(args[0], scores, self.smoothing), *args[1:]), kwargs

    def remove(self) -> None:
        self.handle.remove()
        self.grab.remove()


@torch.no_grad()
def calibrate(model: torch.nn.Module, profile, layer: str, clean: torch.Tensor, quantile: float,
              batch: int = 256, **settings) -> Smoothing:
    """The `Smoothing` at `layer` (a per-position layer of `profile`) whose gate is the clean
    positions' `quantile` of the score, measured with `profile` attached to `model` on `clean`."""
    from .attachment import attached, repair_modules
    from .inference import eval_mode

    if layer not in profile.layer_names:
        raise ValueError(f"smoothing layer {layer!r} is not a layer of the profile ({profile.layer_names})")
    if profile.layer(layer).channel_dim is None:
        raise ValueError(f"smoothing needs a per-position layer; {layer!r} is repaired flattened")
    if clean.dim() != 4 or len(clean) == 0:
        raise ValueError("smoothing is calibrated on clean images (N, C, H, W), N >= 1")
    from .profile import Profile

    found = []
    bare = Profile(layers=profile.layers, fingerprint=profile.fingerprint)  # its own smoothing, if any, off
    with attached(model, bare, check_fingerprint=False), eval_mode(model):
        repair = repair_modules(model)[layer]
        handle = repair.register_forward_hook(lambda m, a, o: found.append(position_scores(m, a[0]).flatten()))
        try:
            for i in range(0, len(clean), batch):
                model(clean[i:i + batch])
        finally:
            handle.remove()
    scores = torch.cat(found).float()
    if scores.numel() == 0:
        raise ValueError("no clean position scores were read")
    gate = torch.quantile(scores, quantile).item() if scores.numel() <= 2 ** 24 else \
        torch.kthvalue(scores.cpu(), max(1, math.ceil(quantile * scores.numel()))).values.item()
    return Smoothing(layer=layer, gate=gate, quantile=quantile, **settings)


class Smoothed(torch.nn.Module):
    """The attached model with its smoothing written out as one forward (the pre-hook off
    inside): what `fire_repair.export` traces, so that the package smooths whether or not the
    exporter runs forward pre-hooks."""

    def __init__(self, model: torch.nn.Module, hook: SmoothingHook):
        super().__init__()
        self.model, self.hook = model, hook

    def forward(self, x):
        (x,), _ = self.hook.smoothed_args(self.model, (x,), {})
        inner, self.hook._inner = self.hook._inner, True
        try:
            return self.model(x)
        finally:
            self.hook._inner = inner
