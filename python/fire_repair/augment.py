"""Image augmentations for unpaired estimation ("to average out content").

Photometric only by default: a geometric augmentation (shifts, flips) also moves a localised
trigger, smearing the very direction being estimated (the demo's ablation measures this).
"""
import torch


class Photometric:
    """Per-image brightness and contrast jitter plus a little Gaussian noise, seeded."""

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, noise: float = 0.02, seed: int = 0):
        self.brightness, self.contrast, self.noise = brightness, contrast, noise
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        shape = (n,) + (1,) * (x.dim() - 1)
        c = 1 + self.contrast * (2 * torch.rand(shape, generator=self.gen) - 1)
        b = self.brightness * (2 * torch.rand(shape, generator=self.gen) - 1)
        eps = self.noise * torch.randn(x.shape, generator=self.gen)
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        return ((x - mean) * c.to(x) + mean + b.to(x) + eps.to(x)).clamp(0, 1)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """The whole batch translated by one random offset of up to `max_shift` pixels (zero fill):
    the usual CIFAR-style crop (training) and a geometric augmentation (estimation)."""
    s = max_shift
    H, W = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (s, s, s, s))
    dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=gen).tolist()
    return padded[..., dy:dy + H, dx:dx + W]


class RandomShift:
    """Random translation by up to `max_shift` pixels (zero fill), seeded."""

    def __init__(self, max_shift: int = 2, seed: int = 0):
        self.max_shift = max_shift
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_shift(x, self.max_shift, self.gen)
