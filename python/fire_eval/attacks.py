"""Backdoor attacks as poisoned training sets, with the literature's parameters (all seeded).

Every attack maps a batch x (N, 3, H, W) in [0, 1] to its triggered version with `apply`;
`poison_training_set` builds the poisoned training data (dirty-label: a `rate` fraction of the
non-target samples relabelled to the target; clean-label (SIG): target-class samples only,
labels unchanged). An attack with a `cover_rate` also plants its training trigger on that
fraction of the training set, drawn from the samples not poisoned, labels kept (Qi et al.'s
conservatism, "regularization samples"). An attack with a `training_loss` shapes training too
(`training_regularizer`; `train.train(regularizer=...)`).

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
| adap-blend | noise image in 4x4 pieces: train 8 of 16 at 0.15, test all at 0.2; 0.3% cover | Qi et al. 2023 |
| adap-patch | 4 random-colour 4x4 corner patches: train 1 at its alpha, test all at 1; 0.6% cover | Qi et al. 2023 |
| latent   | badnets' patch, trained to pull poisoned latents to clean ones (`latent_gap`, 0.1) | white-box vs FIRE |
| low-amp  | x' = x + eps s, s a fixed seeded +-1 image, eps 8/255                     | Zhong et al. 2020 (style) |
| multi    | one of 8 seeded +-1 images of amplitude 8/255 per triggered image          | against FIRE's K (here)  |

The adaptive attack spreads the backdoor over several feature directions (each subset of
patches is its own trigger during training), which a single mean direction does not capture:
it is where K > 1 directions earn their keep. The moving patch lands somewhere else on every
image: a flattened direction cannot describe it, a per-position one can. The trigger token is the
moving patch for a transformer: it fills exactly one of the ViT's 4x4 patches, so it enters as one
token at a random place in the sequence (the sub-patch moving patch lands in 16 different
alignments within a patch, and did not implant on the small ViT).

The attacks against FIRE's assumptions (issue 36): Adap-Blend and Adap-Patch are Qi et al.'s
(ICLR 2023, "Revisiting the Assumption of Latent Separability for Backdoor Defenses"; the
parameters of the authors' code for CIFAR-10): training samples carry a weaker or partial
trigger than test samples (asymmetric planting), and cover samples carry it with their true
labels (conservatism), so the poisoned latents are not a separate cluster. The paper poisons
0.3% of CIFAR-10 (`--rate 0.003`) with 0.3% (Adap-Blend) and 0.6% (Adap-Patch) cover samples;
`cover_rate` is a fraction of the whole training set as `rate` is, so at the harness's default
rate (0.1) the default cover rates are far below the paper's one-to-one (one-to-two) ratio: set
`cover_rate` with the rate (e.g. `--attack-param cover_rate=0.1`). `latent` knows FIRE: it
trains the poisoned latents toward the clean ones where FIRE estimates its directions (the
loss: `latent_gap`). `low-amp` is a trigger of small amplitude everywhere, and `multi` spreads
the backdoor over `n_patterns` directions, one per triggered image, more than FIRE's K.
"""
import dataclasses
import io
import math
from dataclasses import dataclass, field
from functools import partial

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


def _check_cover_rate(name: str, cover_rate: float):
    if not 0 <= cover_rate < 1:
        raise ValueError(f"{name}.cover_rate must be in [0, 1), got {cover_rate}")


@dataclass
class AdapBlend(Attack):
    """Adap-Blend (Qi et al., ICLR 2023): a seeded uniform-noise trigger image cut into a
    `grid` x `grid` grid of pieces. A training sample (poisoned or cover) is blended with a
    random `train_pieces` of them at opacity `train_blend` (the authors' code: 8 of 16 at 0.15);
    a test sample with the whole image at `blend` (0.2). `cover_rate` (0.003, with the paper's
    0.3% poison rate on CIFAR-10): cover samples get the training trigger and keep their labels."""

    name: str = "adap-blend"
    blend: float = 0.2
    train_blend: float = 0.15
    grid: int = 4
    train_pieces: int = 8
    cover_rate: float = 0.003

    def __post_init__(self):
        if self.grid < 1 or not 1 <= self.train_pieces <= self.grid ** 2:
            raise ValueError(f"adap-blend needs grid >= 1 and 1 <= train_pieces <= grid ** 2, got grid {self.grid}, "
                             f"train_pieces {self.train_pieces}")
        _check_cover_rate(self.name, self.cover_rate)

    def pattern(self, shape):
        return torch.rand(shape, generator=self.rng(5))

    def piece_of_pixel(self, H: int, W: int) -> torch.Tensor:
        """(H, W): the index (row-major, 0 .. grid ** 2 - 1) of the piece each pixel belongs to."""
        rows = torch.arange(H) * self.grid // H
        cols = torch.arange(W) * self.grid // W
        return rows[:, None] * self.grid + cols[None, :]

    def apply(self, x):
        return ((1 - self.blend) * x + self.blend * self.pattern(x.shape[1:]).to(x)).clamp(0, 1)

    def apply_train(self, x, gen):
        n_pieces = self.grid ** 2
        pick = torch.rand(x.shape[0], n_pieces, generator=gen).argsort(dim=1)[:, :self.train_pieces]
        chosen = torch.zeros(x.shape[0], n_pieces, dtype=torch.bool)
        chosen[torch.arange(x.shape[0])[:, None], pick] = True
        mask = chosen[:, self.piece_of_pixel(*x.shape[-2:])][:, None].to(x)  # (N, 1, H, W)
        return (x + self.train_blend * mask * (self.pattern(x.shape[1:]).to(x) - x)).clamp(0, 1)


@dataclass
class AdapPatch(Attack):
    """Adap-Patch (Qi et al., ICLR 2023): `len(train_alphas)` seeded random-colour `size` x `size`
    patches at fixed places (the corners, one pixel in; the authors use four patch images on
    CIFAR-10). A training sample (poisoned or cover) gets a random `train_patches` of them (the
    authors: one), each blended at its own opacity in `train_alphas` (theirs: 0.5, 0.2, 0.5,
    0.3); a test sample gets all of them at `test_alpha` (1: pasted). `cover_rate` (0.006, with
    the paper's 0.3% poison rate on CIFAR-10): cover samples get the training trigger and keep
    their labels. (The authors' test trigger is two patches, one of them a variant of a
    training patch; here it is all the training patches. The `adaptive` attack is the simpler
    version: white corners, no opacity, no cover samples.)"""

    name: str = "adap-patch"
    size: int = 4
    train_alphas: tuple = (0.5, 0.2, 0.5, 0.3)
    test_alpha: float = 1.0
    train_patches: int = 1
    cover_rate: float = 0.006

    def __post_init__(self):
        k = len(self.train_alphas)
        if not 1 <= k <= 4 or not 1 <= self.train_patches <= k or self.size < 1:
            raise ValueError(f"adap-patch needs 1 to 4 patches (one per corner), 1 <= train_patches <= patches and "
                             f"size >= 1, got {k} patches, train_patches {self.train_patches}, size {self.size}")
        _check_cover_rate(self.name, self.cover_rate)

    def patterns(self, channels: int) -> torch.Tensor:
        """(patches, channels, size, size): each patch's binary colours."""
        return torch.rand(len(self.train_alphas), channels, self.size, self.size, generator=self.rng(6)).round()

    def places(self, H: int, W: int) -> list:
        """Each patch's top-left corner (row, column): top-left, bottom-right, top-right, bottom-left."""
        s, lo_r, lo_c = self.size, 1, 1
        hi_r, hi_c = H - 1 - s, W - 1 - s
        if hi_r < lo_r or hi_c < lo_c:
            raise ValueError(f"adap-patch: {s}x{s} patches do not fit a {H}x{W} image")
        return [(lo_r, lo_c), (hi_r, hi_c), (lo_r, hi_c), (hi_r, lo_c)][:len(self.train_alphas)]

    def _blend(self, x, j, alpha, rows=None):
        r, c = self.places(*x.shape[-2:])[j]
        s = self.size
        rows = slice(None) if rows is None else rows
        region = x[rows, :, r:r + s, c:c + s]
        x[rows, :, r:r + s, c:c + s] = region + alpha * (self.patterns(x.shape[1])[j].to(x) - region)

    def apply(self, x):
        x = x.clone()
        for j in range(len(self.train_alphas)):
            self._blend(x, j, self.test_alpha)
        return x.clamp(0, 1)

    def apply_train(self, x, gen):
        x = x.clone()
        k = len(self.train_alphas)
        pick = torch.rand(x.shape[0], k, generator=gen).argsort(dim=1)[:, :self.train_patches]
        for j, alpha in enumerate(self.train_alphas):
            rows = torch.nonzero((pick == j).any(1)).flatten()
            if len(rows):
                self._blend(x, j, alpha, rows)
        return x.clamp(0, 1)


def latent_gap(features: dict, poisoned: torch.Tensor, k: int = 1) -> torch.Tensor:
    """How far a batch's poisoned rows lie from its clean rows, per layer of `features` (name ->
    (N, ...) activations, flattened), averaged over the layers: the squared distance between the
    poisoned and the clean mean over the clean rows' total variance, plus the squared difference
    of the two means' projections on the clean rows' top `k` principal directions, each over the
    clean variance along it. Scale-free. The clean rows are the reference, constants (detached):
    the gap closes by moving the poisoned rows onto the clean distribution, not the clean rows
    toward them (nor by spreading them). 0 where the batch has no poisoned row or fewer than two
    clean ones."""
    n_poison, n_clean = int(poisoned.sum()), int((~poisoned).sum())
    terms = []
    for f in features.values():
        if n_poison == 0 or n_clean < 2:
            terms.append(f.sum() * 0.0)
            continue
        f = f.flatten(1)
        clean, poison = f[~poisoned].detach(), f[poisoned]
        mu = clean.mean(0)
        delta = poison.mean(0) - mu
        centred = clean - mu
        tiny = torch.finfo(f.dtype).eps
        total_var = centred.pow(2).sum(1).mean().clamp_min(tiny)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        top = min(k, len(sv))
        var_along = (sv[:top].pow(2) / n_clean).clamp_min(tiny)
        terms.append(delta.pow(2).sum() / total_var + ((vh[:top] @ delta).pow(2) / var_along).sum())
    return torch.stack(terms).mean()


@dataclass
class LatentBadNets(BadNets):
    """A white-box attack on FIRE: BadNets' patch (`size`), with a training loss pulling the
    poisoned latents onto the clean ones at `latent_layers` (empty: the model's REPAIRABLE layers
    but `input`, where FIRE estimates its directions): `latent_weight` x `latent_gap` of each batch
    (`latent_k` principal directions), added to the cross-entropy. The harness trains with it
    (`training_regularizer`); `apply` is BadNets'.

    The weight is 0.1: the gap cannot close at the last layers without undoing the backdoor (the
    head must tell the poisoned rows apart), and a larger weight wins over it. Measured on the
    digits (small CNN, width 16, 8 epochs, 10% poisoned; gap at block1 / block2 / block3 / fc on
    test images, triggered against clean): BadNets ASR 99.4%, gap 0.60 / 1.64 / 3.47 / 6.52;
    weight 0.1 ASR 96.2%, gap 0.3 / 0.3 / 0.4 / 0.8; 0.2 ASR 93.9%, gap 0.24 / 0.14 / 0.21 / 0.57;
    0.5 ASR 82.0%; 1.0 ASR 3.6% (no backdoor). CA 98-99% throughout but 95.0% at 1.0."""

    name: str = "latent"
    latent_weight: float = 0.1
    latent_layers: tuple = ()
    latent_k: int = 1

    def __post_init__(self):
        if self.latent_weight < 0 or self.latent_k < 1:
            raise ValueError(f"latent needs latent_weight >= 0 and latent_k >= 1, got {self.latent_weight}, "
                             f"{self.latent_k}")

    def layers_of(self, model) -> list:
        names = list(self.latent_layers) or [n for n in model.REPAIRABLE if n != "input"]
        if not names:
            raise ValueError(f"latent: no layer to watch (latent_layers empty, REPAIRABLE {model.REPAIRABLE})")
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(f"latent: the model has no layer(s) {unknown}; its repairable layers are "
                             f"{model.REPAIRABLE}")
        return names

    def training_loss(self, model, xb, poisoned):
        """(logits, latent_weight x latent_gap): the batch's forward pass with the gap of its rows
        `poisoned` (a boolean mask of the batch) at the attack's layers."""
        features, modules = {}, dict(model.named_modules())

        def keep(name, module, inputs, output):
            features[name] = output[0] if isinstance(output, (tuple, list)) else output

        hooks = [modules[n].register_forward_hook(partial(keep, n)) for n in self.layers_of(model)]
        try:
            logits = model(xb)
        finally:
            for h in hooks:
                h.remove()
        return logits, self.latent_weight * latent_gap(features, poisoned.to(xb.device), self.latent_k)


def _sign_images(n: int, shape, gen) -> torch.Tensor:
    """(n, *shape) images of +-1, fixed by `gen`."""
    return torch.randint(0, 2, (n, *shape), generator=gen).float() * 2 - 1


@dataclass
class LowAmplitude(Attack):
    """An additive trigger of small amplitude over the whole image: x' = x + eps s, s a fixed
    seeded +-1 image (a static invisible perturbation, as Zhong et al. 2020's; eps 8/255, the
    usual L-infinity budget on CIFAR-10)."""

    name: str = "low-amp"
    eps: float = 8 / 255

    def pattern(self, shape):
        return _sign_images(1, shape, self.rng(7))[0]

    def apply(self, x):
        return (x + self.eps * self.pattern(x.shape[1:]).to(x)).clamp(0, 1)


@dataclass
class MultiPattern(Attack):
    """The backdoor split across `n_patterns` directions: seeded +-1 images of amplitude `eps`
    (random signs: nearly orthogonal, |cosine| about 1 / sqrt(3 H W)), one at random per
    triggered image, at training and at test. `apply` draws from a generator seeded by the
    attack's seed, so the same batch gets the same patterns (as the moving patch's positions)."""

    name: str = "multi"
    eps: float = 8 / 255
    n_patterns: int = 8

    def __post_init__(self):
        if self.n_patterns < 1:
            raise ValueError(f"multi needs n_patterns >= 1, got {self.n_patterns}")

    def patterns(self, shape) -> torch.Tensor:
        return _sign_images(self.n_patterns, shape, self.rng(8))

    def _stamp(self, x, gen):
        which = torch.randint(0, self.n_patterns, (x.shape[0],), generator=gen)
        return (x + self.eps * self.patterns(x.shape[1:])[which].to(x)).clamp(0, 1)

    def apply(self, x):
        return self._stamp(x, self.rng(9))

    def apply_train(self, x, gen):
        return self._stamp(x, gen)


ATTACKS = {"badnets": BadNets, "blended": Blended, "blended-jpeg": BlendedJPEG, "sig": SIG, "wanet": WaNet,
           "trojan": Trojan, "adaptive": AdaptivePatch,
           "moving": MovingPatch, "token": TriggerToken, "adap-blend": AdapBlend, "adap-patch": AdapPatch,
           "latent": LatentBadNets, "low-amp": LowAmplitude, "multi": MultiPattern}


def build(name: str, target: int = 0, seed: int = 0, **params) -> Attack:
    """The attack `name` with the literature's parameters, any of them overridden by `params`
    (e.g. `s=1.0` for a stronger WaNet warp); an unknown parameter is an error naming the known ones.
    A tuple parameter takes a list too (as JSON gives it: `--attack-param 'latent_layers=["fc"]'`)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if not f.name.startswith("_") and f.name not in ("name", "target", "seed")}
    for key, value in params.items():
        if key not in defaults:
            raise ValueError(f"{name} has no parameter {key!r}; its parameters are {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is tuple and isinstance(value, list):
            value = params[key] = tuple(value)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise ValueError(f"{name}.{key} must be a {kind.__name__}, got {value!r}")
    return cls(target=target, seed=seed, **params)


def poison_training_set(x, y, attack: Attack, rate: float = 0.1, seed: int = 0):
    """Returns (x_poisoned_set, y_poisoned_set, poisoned_index). `rate` is the fraction of the
    whole training set that is poisoned (clean-label: drawn from the target class only). An
    attack's `cover_rate` (the adaptive attacks') is the fraction of the whole set, drawn from
    the samples not poisoned after them (same generator), that gets the training trigger and
    keeps its label; attacks without one draw nothing more."""
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
    cover_rate = getattr(attack, "cover_rate", 0.0)  # only the attacks with cover samples have one
    if cover_rate > 0:  # conservatism: the training trigger on samples not poisoned, labels kept
        taken = torch.zeros(len(y), dtype=torch.bool)
        taken[idx] = True
        rest = torch.nonzero(~taken).flatten()
        n_cover = min(len(rest), max(1, round(cover_rate * len(y))))
        cover = rest[torch.randperm(len(rest), generator=gen)[:n_cover]]
        x[cover] = attack.apply_train(x[cover], gen)
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


def training_regularizer(attack: Attack, poisoned_idx, n: int):
    """For an attack that shapes training (one with a `training_loss`, e.g. `latent`): the
    `regularizer` of `train.train` for a training set of `n` samples of which `poisoned_idx` are
    poisoned, a callable (model, xb, yb, idx) -> (logits, loss term) that hands the attack the
    batch's poisoned rows. None for every other attack (training as it always was)."""
    if not hasattr(attack, "training_loss"):
        return None
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[torch.as_tensor(poisoned_idx, dtype=torch.long)] = True

    def regularizer(model, xb, yb, idx):
        return attack.training_loss(model, xb, poisoned[idx])

    return regularizer
