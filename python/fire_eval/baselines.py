"""Runtime mitigations run through the same harness: each is `fit` on the defender's clean
held-out data, then `predict(x)` gives labels (-1: rejected).

- `NoDefense`
- `ShrinkPad` (Li et al., 2021): shrink by `pad` pixels, pad back at a random offset;
- `JPEG` (input purification): JPEG compression at `quality`;
- `Blur` (input purification): Gaussian blur;
- `STRIP` (Gao et al., 2019): superimpose held-out clean images; low prediction entropy means
  a trigger dominates, and the input is rejected (threshold: the `frr` quantile of clean entropy).
Not included, as they need training or optimisation beyond a runtime filter: Neural Cleanse,
fine-pruning, ANP, and the test-time purifiers built on diffusion models (no pretrained
weights offline).
"""
import torch
import torch.nn.functional as F

from .attacks import jpeg_compress
from .metrics import predict


class Defense:
    name = "defense"
    reference = False  # a reference row (not a defense), set apart in the plot

    def fit(self, model, x_clean):
        self.model = model
        return self

    def fit_run(self, run):
        """Fits from what a harness run holds (`harness.Run`): a runtime filter needs the model
        and the defender's clean images."""
        return self.fit(run.model, run.held.clean)

    def transform(self, x):
        return x

    def predict(self, x):
        return predict(self.model, self.transform(x))


class NoDefense(Defense):
    name = "none"


class ShrinkPad(Defense):
    name = "shrinkpad"

    def __init__(self, pad: int = 4, seed: int = 0):
        self.pad, self.gen = pad, torch.Generator().manual_seed(seed)

    def transform(self, x):
        H, W = x.shape[-2:]
        small = F.interpolate(x, size=(H - self.pad, W - self.pad), mode="bilinear", align_corners=False)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            dy, dx = torch.randint(0, self.pad + 1, (2,), generator=self.gen).tolist()
            out[n, :, dy:dy + H - self.pad, dx:dx + W - self.pad] = small[n]
        return out


class JPEG(Defense):
    name = "jpeg"

    def __init__(self, quality: int = 50):
        self.quality = quality

    def transform(self, x):
        return jpeg_compress(x, self.quality)


class Blur(Defense):
    name = "blur"

    def __init__(self, sigma: float = 1.0, size: int = 5):
        self.sigma, self.size = sigma, size

    def transform(self, x):
        r = torch.arange(self.size, dtype=x.dtype) - self.size // 2
        k1 = torch.exp(-(r**2) / (2 * self.sigma**2))
        k1 = k1 / k1.sum()
        k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, -1, -1)
        return F.conv2d(F.pad(x, [self.size // 2] * 4, mode="reflect"), k, groups=x.shape[1])


class STRIP(Defense):
    name = "strip"

    def __init__(self, n: int = 16, frr: float = 0.05, seed: int = 0):
        self.n, self.frr, self.gen = n, frr, torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def entropy(self, x):
        ent = []
        for img in x:
            pick = torch.randint(0, self.pool.shape[0], (self.n,), generator=self.gen)
            mixed = 0.5 * img[None] + 0.5 * self.pool[pick]
            p = torch.softmax(self.model(mixed), 1)
            ent.append(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
        return torch.stack(ent) if ent else torch.zeros(0)

    def fit(self, model, x_clean):
        self.model, self.pool = model, x_clean
        self.threshold = torch.quantile(self.entropy(x_clean), self.frr).item()
        return self

    def predict(self, x):
        pred = predict(self.model, x)
        pred[self.entropy(x) < self.threshold] = -1
        return pred


BASELINES = {"none": NoDefense, "shrinkpad": ShrinkPad, "jpeg": JPEG, "blur": Blur, "strip": STRIP}
