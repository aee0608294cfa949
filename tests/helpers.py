"""Input builders and per-dtype tolerances shared by the op tests."""
import torch

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
