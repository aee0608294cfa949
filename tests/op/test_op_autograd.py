"""The op's autograd formula against autograd through the fp64 reference, and opcheck."""
import pytest
import torch
from helpers import make_params, make_slope, make_x

import fire_repair as fr

GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("layout", ["2d", "channels_last"])
@pytest.mark.parametrize("with_scores", [False, True])
def test_gradients_match_reference(backend, mode, layout, with_scores):
    x = make_x(layout, torch.float32, backend, n=6)
    V, a, mu, tau = make_params(x, 3, mode, backend)
    slope = make_slope(mode, 3, backend)
    ours = _leaves(x, V, a, mu, tau, slope)
    theirs = _leaves(x, V, a, mu, tau, slope)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(x.shape, generator=g).to(backend)
    w_sc = torch.randn(x.shape[0], 3, generator=g).to(backend)

    out, sc = torch.ops.fire.repair_with_scores(*ours[:5], mode, slope=ours[5])
    if not with_scores:
        out, sc = torch.ops.fire.repair(*ours[:5], mode, slope=ours[5]), None
    loss = (out * w_out).sum() + ((sc * w_sc).sum() if with_scores else 0)
    loss.backward()

    ref_out, ref_sc = fr.repair_reference(theirs[0].double(), *theirs[1:5], mode, slope=theirs[5])
    ref_loss = (ref_out * w_out.double()).sum() + ((ref_sc * w_sc.double()).sum() if with_scores else 0)
    ref_loss.backward()
    names = ["x", "directions", "alpha", "center", "tau", "slope"]
    for name, mine, ref in zip(names, ours, theirs, strict=True):
        if mine is None:
            continue
        assert mine.grad is not None, name
        assert mine.grad.shape == mine.shape and mine.grad.dtype == mine.dtype, name
        expected = torch.zeros_like(mine) if ref.grad is None else ref.grad.to(mine.dtype)  # unused input
        torch.testing.assert_close(mine.grad, expected, msg=name, **GRAD_TOL)


def test_gradient_in_low_precision(backend):
    x = make_x("channels_last", torch.bfloat16, backend).requires_grad_()
    V, a, mu, _ = make_params(x, 2, "project", backend)
    torch.ops.fire.repair(x, V, a, mu, None, "project").float().sum().backward()
    ref = x.detach().float().requires_grad_()
    fr.repair_reference(ref, V, a, mu, None, "project", compute_dtype=torch.float32)[0].sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=1.6e-2, atol=1.6e-2)


def _opcheck_samples(device):
    samples = []
    for layout in ["2d", "channels_last", "row_strided"]:
        for mode in fr.MODES:
            x = make_x(layout, torch.float32, device, n=4)
            V, a, mu, tau = make_params(x, 3, mode, device)
            slope = make_slope(mode, 3, device)
            for t in (x, V, a, mu, tau, slope):  # every differentiable input, so opcheck tests each gradient
                if t is not None:
                    t.requires_grad_()
            samples.append((x, V, a, mu, tau, mode, None, slope))
    x = make_x("4d", torch.bfloat16, device)
    V, a, _, _ = make_params(x, 2, "shift", device)
    samples.append((x, V, a, None, None, "shift"))
    V, a, mu, _ = make_params(make_x("2d", torch.float32, device), 2, "project", device)
    samples.append((make_x("2d", torch.float32, device, n=0), V, a, mu, None, "project"))
    return samples


@pytest.mark.parametrize("op", ["repair", "repair_with_scores"])
def test_opcheck(op):
    """torch.library.opcheck: schema, fake, autograd registration, AOT dispatch (CPU; CUDA in test_gpu)."""
    for args in _opcheck_samples("cpu"):
        torch.library.opcheck(getattr(torch.ops.fire, op).default, args)


def test_opcheck_backward_op():
    g = make_x("channels_last", torch.float32, "cpu")
    V, _, _, _ = make_params(g, 3, "project", "cpu")
    w = torch.rand(g.shape[0], 3)
    torch.library.opcheck(torch.ops.fire._repair_grad.default, (g, V, w))


def test_opcheck_native_kernel():
    x = torch.randn(1, 4, 9)  # (B, P, D): flattened rows
    nchw = torch.randn(2, 9, 3).transpose(1, 2)  # channels strided over positions
    V = torch.randn(2, 9)
    for args in [(x, V, torch.rand(2), torch.randn(9), torch.rand(2), 2, True),
                 (x, V, torch.rand(4, 2), None, None, 1, False),
                 (nchw, V, torch.rand(2), torch.randn(9), None, 1, True),
                 (x, V, torch.rand(2), torch.randn(9), torch.rand(2), 4, True, torch.tensor([-0.2, 0.1])),
                 (nchw, V, torch.rand(2), torch.randn(9), None, 4, False, torch.tensor([-0.2, 0.1]))]:
        torch.library.opcheck(torch.ops.fire._repair_native.default, args)


def test_invert_second_derivative_in_x(backend):
    """A gradient penalty through mode invert: d/dx of |dL/dx|^2 matches the reference's."""
    x = make_x("2d", torch.float32, backend, n=6)
    V, a, mu, tau = make_params(x, 3, "invert", backend)
    slope = make_slope("invert", 3, backend)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(backend)
    grads = []
    for fn in (lambda t: torch.ops.fire.repair(t, V, a, mu, tau, "invert", slope=slope),
               lambda t: fr.repair_reference(t, V, a, mu, tau, "invert", slope=slope)[0]):
        leaf = x.double().clone().requires_grad_() if len(grads) else x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((fn(leaf) ** 2 * w.to(leaf.dtype)).sum(), leaf, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.pow(2).sum(), leaf)
        grads.append(ggx)
    torch.testing.assert_close(grads[0], grads[1].float(), **GRAD_TOL)
