"""Input builders and per-dtype tolerances shared by the tests."""
from collections import OrderedDict

import torch
from torch import nn

# (rtol, atol) of the repaired output against the fp64 reference (outputs are rounded to dtype).
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SCORE_TOL = (1e-4, 1e-4)  # scores are fp32 whatever the storage dtype


def make_x(layout: str, dtype, device, n: int = 5):
    """Activations in one of the layouts the op must accept; all give the same logical tensor."""
    g = torch.Generator().manual_seed(1)
    if layout == "2d":
        x = torch.randn(n, 37, generator=g)
    elif layout == "4d":
        x = torch.randn(n, 3, 5, 7, generator=g)
    elif layout == "channels_last":
        x = torch.randn(n, 3, 5, 7, generator=g).to(memory_format=torch.channels_last)
    elif layout == "transposed":  # dense, but H and W swapped in memory
        x = torch.randn(n, 3, 7, 5, generator=g).transpose(2, 3)
    elif layout == "strided":  # rows not dense: the op copies
        x = torch.randn(n, 3, 5, 14, generator=g)[..., ::2]
    elif layout == "row_strided":  # every other sample of a batch
        x = torch.randn(2 * n, 3, 5, 7, generator=g)[::2]
    elif layout == "3d":
        x = torch.randn(n, 9, 11, generator=g)
    else:
        raise ValueError(layout)
    return x.to(device=device, dtype=dtype)


def make_params(x, k: int, mode: str, device, seed: int = 2, directions_shape: str = "flat"):
    g = torch.Generator().manual_seed(seed)
    feat = tuple(x.shape[1:])
    D = 1
    for s in feat:
        D *= s
    V = torch.randn(k, D, generator=g) / max(D, 1) ** 0.5
    alpha = 0.5 + torch.rand(k, generator=g)
    center = 0.1 * torch.randn(D, generator=g)
    tau = 0.2 * torch.rand(k, generator=g) if mode == "clamp" else None
    if directions_shape == "full":
        V = V.reshape(k, *feat)
        center = center.reshape(feat)
    to = dict(device=device)
    return V.to(**to), alpha.to(**to), center.to(**to), None if tau is None else tau.to(**to)


# ----------------------------------------------------------------------------- estimator tests

D = 24


def identity_model():
    """The 'feat' layer outputs the input itself, so planted directions are known exactly."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(feat=nn.Flatten(), head=nn.Linear(D, 3)))


def planted(n=200, seed=0, k=1):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, 3, generator=g))
    u = basis.T  # (3, D) orthonormal
    clean = torch.randn(n, D, generator=g)
    shift = 3.0 * u[0]
    if k > 1:  # differences vary along u1, u2 as well
        coef = torch.randn(n, 2, generator=g) * torch.tensor([2.0, 1.0])
        shift = shift + coef @ u[1:]
    return clean, clean + shift, u
