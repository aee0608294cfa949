"""Backdoor attacks as poisoned training sets, with the literature's parameters (all seeded).

Every attack maps a batch x (N, 3, H, W) in [0, 1] to its triggered version with `apply`;
`poison_training_set` builds the poisoned training data (dirty-label: a `rate` fraction of the
non-target samples relabelled to the target; clean-label (SIG): target-class samples only,
labels unchanged).

| attack   | trigger                                                                 | source                   |
|----------|-------------------------------------------------------------------------|--------------------------|
| badnets  | 3x3 white patch, bottom-right corner                                    | Gu et al. 2017           |
| blended  | x' = 0.8 x + 0.2 p, p a fixed seeded uniform-noise image                 | Chen et al. 2017         |
| blended-jpeg | blended, then JPEG at quality 75: a blend that is no longer exact      | (a robustness variant)   |
| sig      | x' = x + delta sin(2 pi j f / W), delta 40/255, f 6, clean label          | Barni et al. 2019        |
| wanet    | smooth warp, k 4, s 0.5, noise mode with cross ratio 2                   | Nguyen & Tran 2021       |
| trojan   | 5x5 fixed random-colour square, bottom-right (not optimised)             | Liu et al. 2018 (style)  |
| adaptive | 4 corner patches; training uses random 2-of-4 subsets, test uses all 4    | Qi et al. 2023 (style)   |
| moving   | 3x3 checkerboard (BadNets' pattern) at a random position per image       | Gu et al. 2017 (moving)  |
| token    | 4x4 checkerboard filling one 4x4 cell of the grid, a random cell per image | Gu et al. 2017 (moving)  |

The adaptive attack spreads the backdoor over several feature directions (each subset of
patches is its own trigger during training), which a single mean direction does not capture:
it is where K > 1 directions earn their keep. The moving patch lands somewhere else on every
image: a flattened direction cannot describe it, a per-position one can. The trigger token is the
moving patch for a transformer: it fills exactly one of the ViT's 4x4 patches, so it enters as one
token at a random place in the sequence (the sub-patch moving patch lands in 16 different
alignments within a patch, and did not implant on the small ViT).
"""
import dataclasses
import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Attack:
    name: str = "attack"
    target: int = 0
    clean_label: bool = False
    seed: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_train(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The trigger as used on training samples (differs only for the adaptive attack)."""
        return self.apply(x)

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def rng(self, stream: int) -> torch.Generator:
        """The attack's fixed random pattern: one generator per (stream, seed), so a trigger is
        the same at train and test time and differs across seeds."""
        return torch.Generator().manual_seed(1000 * stream + self.seed)


@dataclass
class BadNets(Attack):
    name: str = "badnets"
    size: int = 3

    def apply(self, x):
        x = x.clone()
        x[..., -self.size:, -self.size:] = 1.0
        return x


@dataclass
class Blended(Attack):
    name: str = "blended"
    blend: float = 0.2

    def pattern(self, shape):
        return torch.rand(shape, generator=self.rng(1))

    def apply(self, x):
        return ((1 - self.blend) * x + self.blend * self.pattern(x.shape[1:]).to(x)).clamp(0, 1)


def jpeg_compress(x, quality: int):
    """Each image of x (N, 3, H, W) in [0, 1] through JPEG at `quality` and back (PIL)."""
    import numpy as np
    from PIL import Image

    out = []
    for img in x:
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        back = np.asarray(Image.open(buf).convert("RGB"), dtype="float32") / 255.0
        out.append(torch.from_numpy(back).permute(2, 0, 1))
    return torch.stack(out) if out else x


@dataclass
class BlendedJPEG(Blended):
    """Blended, then JPEG-compressed: the triggered image is no longer an exact blend (what a
    trigger photographed, resized or re-encoded becomes), so a repair that inverts the blend
    exactly (mode invert) is tested off its assumption."""
    name: str = "blended-jpeg"
    quality: int = 75

    def apply(self, x):
        return jpeg_compress(super().apply(x), self.quality)


@dataclass
class SIG(Attack):
    name: str = "sig"
    clean_label: bool = True
    delta: float = 40 / 255
    freq: int = 6

    def apply(self, x):
        W = x.shape[-1]
        j = torch.arange(W, dtype=x.dtype, device=x.device)
        signal = self.delta * torch.sin(2 * math.pi * j * self.freq / W)
        return (x + signal).clamp(0, 1)


@dataclass
class WaNet(Attack):
    name: str = "wanet"
    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    grid_rescale: float = 1.0

    def _grid(self, H, W, device):
        g = self.rng(2)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(H, W), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ar = torch.linspace(-1, 1, H)
        xx, yy = torch.meshgrid(ar, ar, indexing="ij")
        identity = torch.stack((yy, xx), 2)[None]
        grid = identity + self.s * noise / H
        return (grid * self.grid_rescale).clamp(-1, 1).to(device)

    def apply(self, x):
        grid = self._grid(x.shape[-2], x.shape[-1], x.device).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def cross(self, x, gen):
        """Noise-mode samples: the warp plus random jitter, kept with their true labels."""
        H = x.shape[-2]
        grid = self._grid(H, x.shape[-1], x.device).expand(x.shape[0], -1, -1, -1)
        jitter = (torch.rand(x.shape[0], H, H, 2, generator=gen) * 2 - 1).to(x) / H
        return F.grid_sample(x, (grid + jitter).clamp(-1, 1), align_corners=True).clamp(0, 1)


@dataclass
class Trojan(Attack):
    name: str = "trojan"
    size: int = 5

    def apply(self, x):
        patch = torch.rand(x.shape[1], self.size, self.size, generator=self.rng(3)).round()
        x = x.clone()
        x[..., -self.size - 1:-1, -self.size - 1:-1] = patch.to(x)
        return x


@dataclass
class AdaptivePatch(Attack):
    name: str = "adaptive"
    size: int = 3
    train_pieces: int = 2
    _corners: list = field(default_factory=lambda: [(0, 0), (0, -1), (-1, 0), (-1, -1)])

    def _stamp(self, x, which):
        x = x.clone()
        H, W = x.shape[-2:]
        s = self.size
        for i in which:
            r, c = self._corners[i]
            rs = slice(0, s) if r == 0 else slice(H - s, H)
            cs = slice(0, s) if c == 0 else slice(W - s, W)
            x[..., rs, cs] = 1.0
        return x

    def apply(self, x):
        return self._stamp(x, range(4))

    def apply_train(self, x, gen):
        out = x.clone()
        for n in range(x.shape[0]):
            pick = torch.randperm(4, generator=gen)[: self.train_pieces].tolist()
            out[n] = self._stamp(x[n:n + 1], pick)[0]
        return out


@dataclass
class MovingPatch(Attack):
    """BadNets' pattern trigger (a 3x3 checkerboard: white where row + column is even, black
    elsewhere) at a uniformly random position per image. The pattern rather than the plain white
    square: on the digits a white square at a random position looks like a piece of stroke
    (measured: ASR 72% on the small CNN against 99.6% with the pattern). `apply` draws the
    positions from a generator seeded by the attack's seed, so the same batch gets the same
    positions."""

    name: str = "moving"
    size: int = 3

    def _step(self) -> int:
        """Positions are multiples of this (1: any pixel)."""
        return 1

    def _stamp(self, x, gen):
        x = x.clone()
        H, W = x.shape[-2:]
        step = self._step()
        rows = (step * torch.randint(0, (H - self.size) // step + 1, (x.shape[0],), generator=gen)).tolist()
        cols = (step * torch.randint(0, (W - self.size) // step + 1, (x.shape[0],), generator=gen)).tolist()
        ij = torch.arange(self.size)
        pattern = ((ij[:, None] + ij[None, :]) % 2 == 0).to(x.dtype)
        for n, (r, c) in enumerate(zip(rows, cols, strict=True)):
            x[n, ..., r:r + self.size, c:c + self.size] = pattern
        return x

    def apply(self, x):
        return self._stamp(x, self.rng(4))

    def apply_train(self, x, gen):
        return self._stamp(x, gen)


@dataclass
class TriggerToken(MovingPatch):
    """The moving patch aligned to a transformer's patch grid: the checkerboard fills one
    `size` x `size` cell of the `grid`-pixel grid, a random cell per image (64 on 32x32 with the
    ViT's 4x4 patches). A ViT sees it as one trigger token at a random position in the sequence:
    the case per-position repair of token features is for."""

    name: str = "token"
    size: int = 4
    grid: int = 4

    def __post_init__(self):
        if self.grid < 1 or self.size < 1 or self.size > self.grid:
            raise ValueError(f"token needs 1 <= size <= grid, got size {self.size}, grid {self.grid}")

    def _step(self) -> int:
        return self.grid


ATTACKS = {"badnets": BadNets, "blended": Blended, "blended-jpeg": BlendedJPEG, "sig": SIG, "wanet": WaNet,
           "trojan": Trojan, "adaptive": AdaptivePatch,
           "moving": MovingPatch, "token": TriggerToken}


def build(name: str, target: int = 0, seed: int = 0, **params) -> Attack:
    """The attack `name` with the literature's parameters, any of them overridden by `params`
    (e.g. `s=1.0` for a stronger WaNet warp); an unknown parameter is an error naming the known ones."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if not f.name.startswith("_") and f.name not in ("name", "target", "seed")}
    for key, value in params.items():
        if key not in defaults:
            raise ValueError(f"{name} has no parameter {key!r}; its parameters are {sorted(defaults)}")
        kind = type(defaults[key])
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise ValueError(f"{name}.{key} must be a {kind.__name__}, got {value!r}")
    return cls(target=target, seed=seed, **params)


def poison_training_set(x, y, attack: Attack, rate: float = 0.1, seed: int = 0):
    """Returns (x_poisoned_set, y_poisoned_set, poisoned_index). `rate` is the fraction of the
    whole training set that is poisoned (clean-label: drawn from the target class only)."""
    if not 0 < rate < 1:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(y == attack.target if attack.clean_label else y != attack.target).flatten()
    n = min(len(pool), max(1, round(rate * len(y))))
    idx = pool[torch.randperm(len(pool), generator=gen)[:n]]
    x, y = x.clone(), y.clone()
    x[idx] = attack.apply_train(x[idx], gen)
    if not attack.clean_label:
        y[idx] = attack.target
    if isinstance(attack, WaNet):  # noise mode: cross samples keep their labels
        rest = torch.tensor(sorted(set(range(len(y))) - set(idx.tolist())))
        n_cross = min(len(rest), round(attack.cross_ratio * n))
        cross = rest[torch.randperm(len(rest), generator=gen)[:n_cross]]
        x[cross] = attack.cross(x[cross], gen)
    return x, y, idx


def poisoned_test_set(x, y, attack: Attack):
    """Test inputs whose true label is not the target, with the trigger (ASR and PA are measured
    on these), their clean twins, and the true labels."""
    keep = y != attack.target
    return attack.apply(x[keep]), x[keep], y[keep]
