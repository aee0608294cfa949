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
    tau = 0.2 * torch.rand(k, generator=g) if mode in ("clamp", "gated", "invert") else None
    if directions_shape == "full":
        V = V.reshape(k, *feat)
        center = center.reshape(feat)
    to = dict(device=device)
    return V.to(**to), alpha.to(**to), center.to(**to), None if tau is None else tau.to(**to)


def make_slope(mode: str, k: int, device, seed: int = 4):
    """The slope of mode invert (None for the other modes): values in [-0.3 / k, 0.3], so that
    1 + h = 1 + sum_k alpha_k [flagged] slope_k stays >= 0.55 for any alpha <= 1.5."""
    if mode != "invert":
        return None
    g = torch.Generator().manual_seed(seed)
    return (-0.3 / k + (0.3 + 0.3 / k) * torch.rand(k, generator=g)).to(device)


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


def check_compiled_matches_eager(model):
    """torch.compile(fullgraph, dynamic) of `model` (input (n, 3, 6, 6)) equals eager, and a
    new batch size after the first does not recompile. All sizes >= 16: CPU conv fakes guard on
    batch < 16; 17 equals no static dim (duck sizing)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for i, n in enumerate([17, 33, 64]):
            x = torch.randn(n, 3, 6, 6)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(x)
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def check_compiled_scores_and_grads(model):
    """Compiled (out, scores) and the input gradient through both equal eager."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    y, s = compiled(x)
    (y.sum() + s.sum()).backward()
    g = x.grad.clone()
    x.grad = None
    y2, s2 = model(x)
    (y2.sum() + s2.sum()).backward()
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-4)
