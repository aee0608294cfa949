"""The per-position form of the op (`channel_dim`): one (K, C) direction set applied at every
position of a feature map or token tensor. Every backend against the fp64 reference over modes,
K, dtypes, layouts and odd sizes; errors; opcheck; autograd; compile and export."""
import re

import pytest
import torch
from helpers import OUT_TOL, SCORE_TOL, check_compiled_matches_eager, check_compiled_scores_and_grads, make_slope

import fire_repair as fr

# layout -> (builder of a logical tensor, channel_dim)
LAYOUTS = {
    "nchw": (lambda g, n: torch.randn(n, 6, 5, 7, generator=g), 1),  # channels strided by H*W
    "channels_last": (lambda g, n: torch.randn(n, 6, 5, 7, generator=g).to(memory_format=torch.channels_last), 1),
    "tokens": (lambda g, n: torch.randn(n, 9, 6, generator=g), -1),  # (N, T, C)
    "tokens_dim2": (lambda g, n: torch.randn(n, 9, 6, generator=g), 2),
    "ncl": (lambda g, n: torch.randn(n, 6, 11, generator=g), 1),  # 1-d sequence, channels first
    "ncdhw": (lambda g, n: torch.randn(n, 6, 2, 3, 4, generator=g), 1),
    "row_strided": (lambda g, n: torch.randn(2 * n, 6, 5, 7, generator=g)[::2], 1),
    "position_strided": (lambda g, n: torch.randn(n, 6, 5, 14, generator=g)[..., ::2], 1),
    "sliced_channels": (lambda g, n: torch.randn(n, 12, 5, 7, generator=g)[:, 3:9], 1),
    "transposed_tokens": (lambda g, n: torch.randn(n, 6, 9, generator=g).transpose(1, 2), 2),  # (N, T, C), C strided
    "no_positions": (lambda g, n: torch.randn(n, 6, generator=g), 1),
}


def make(layout, dtype, device, n=3, k=3, mode="clamp", seed=1):
    build, cd = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = build(g, n).to(device=device, dtype=dtype)
    C = x.shape[cd]
    V = (torch.randn(k, C, generator=g) / C**0.5).to(device)
    a = (0.5 + torch.rand(k, generator=g)).to(device)
    mu = (0.1 * torch.randn(C, generator=g)).to(device)
    tau = (0.2 * torch.rand(k, generator=g)).to(device) if mode == "clamp" else None
    return x, V, a, mu, tau, cd


def lead_shape(x, cd):
    cd = cd % x.dim()
    return tuple(s for d, s in enumerate(x.shape) if d != cd)


def check(out, scores, x, V, a, mu, tau, mode, cd, slope=None):
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, mode, channel_dim=cd, slope=slope)
    rtol, atol = OUT_TOL[x.dtype]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
    if scores is not None:
        assert scores.shape == (*lead_shape(x, cd), V.shape[0]) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, ref_scores, rtol=SCORE_TOL[0], atol=SCORE_TOL[1])


# K over fp32, dtypes at K=3, and the widest K in bf16
K_DTYPES = [(1, torch.float32), (3, torch.float32), (16, torch.float32), (3, torch.float16), (3, torch.bfloat16),
            (16, torch.bfloat16)]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("k,dtype", K_DTYPES, ids=[f"k{k}-{str(d)[6:]}" for k, d in K_DTYPES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(backend, mode, k, dtype, layout):
    x, V, a, mu, tau, cd = make(layout, dtype, backend, k=k, mode=mode)
    slope = make_slope(mode, k, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, slope)
    check(out, scores, x, V, a, mu, tau, mode, cd, slope)
    out_only = torch.ops.fire.repair(x, V, a, mu, tau, mode, channel_dim=cd, slope=slope)
    # the same kernel on the CPU; on a GPU the scores-writing variant is compiled separately and
    # ptxas may contract its multiply-adds differently (seen on an H100: 1 ulp at K = 16)
    tol = (0, 0) if backend == "cpu" else (2e-6, 2e-6)
    torch.testing.assert_close(out_only, out, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens", "transposed_tokens", "ncdhw"])
def test_no_copy_and_memory_format_kept(backend, layout):
    """Dense inputs are read in place: out has exactly x's strides."""
    x, V, a, mu, tau, cd = make(layout, torch.float32, backend)
    out = torch.ops.fire.repair(x, V, a, mu, tau, "clamp", cd)
    assert out.stride() == x.stride()


@pytest.mark.parametrize("C", [1, 2, 7, 100, 1000, 4097, 16385])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_channel_counts(backend, C, layout):
    """Odd channel counts, both sides of the fused/split boundary of the Triton kernels."""
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 3, 1, generator=g) if layout == "nchw" else torch.randn(2, 3, C, generator=g)
    cd = 1 if layout == "nchw" else 2
    x = x.to(backend)
    V = (torch.randn(3, C, generator=g) / C**0.5).to(backend)
    a, mu, tau = torch.rand(3, generator=g).to(backend), (0.1 * torch.randn(C, generator=g)).to(backend), None
    tau = (0.1 * torch.rand(3, generator=g)).to(backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "clamp", cd)
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, "clamp", channel_dim=cd)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(0, 6, 5, 7), (3, 6, 0, 7), (1, 6, 1, 1), (70, 6, 3, 3), (2, 6, 31, 33)])
@pytest.mark.parametrize("mode", fr.MODES)
def test_sizes(backend, shape, mode):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(backend)
    V = torch.randn(2, 6, generator=g).to(backend) / 3
    a, mu = torch.rand(2, generator=g).to(backend), torch.randn(6, generator=g).to(backend)
    tau = torch.rand(2, generator=g).to(backend) if mode == "clamp" else None
    slope = make_slope(mode, 2, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, 1, slope)
    check(out, scores, x, V, a, mu, tau, mode, 1, slope)


def test_a_moved_trigger_is_repaired_where_it_lands(backend):
    """A shift along v planted at a different position in each sample is removed at that position
    only (clamp: the clean positions, below tau, pass untouched)."""
    g = torch.Generator().manual_seed(4)
    C = 8
    x = torch.randn(4, C, 6, 6, generator=g) * 0.1
    v = torch.nn.functional.normalize(torch.randn(C, generator=g), dim=0)
    poisoned = x.clone()
    spots = [(0, 0), (5, 5), (2, 3), (4, 1)]
    for i, (h, w) in enumerate(spots):
        poisoned[i, :, h, w] += 5.0 * v
    V, a, tau = v[None].to(backend), torch.ones(1, device=backend), torch.full((1,), 1.0, device=backend)
    out, scores = torch.ops.fire.repair_with_scores(poisoned.to(backend), V, a, None, tau, "clamp", 1)
    out = out.cpu()
    for i, (h, w) in enumerate(spots):
        assert scores[i, h, w, 0] > 4.5
        # what remains along v is exactly tau at the trigger; everything else is untouched
        torch.testing.assert_close(out[i, :, h, w] @ v, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[h, w] = False
        assert torch.equal(out[i][:, mask], poisoned[i][:, mask])


def test_per_position_on_1x1_maps_equals_flattened(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 6, 1, 1, generator=g).to(backend)
    V, a, mu = torch.randn(2, 6, generator=g).to(backend), torch.rand(2).to(backend), torch.randn(6).to(backend)
    flat, s_flat = torch.ops.fire.repair_with_scores(x, V, a, mu, None, "project")
    pos, s_pos = torch.ops.fire.repair_with_scores(x, V, a, mu, None, "project", 1)
    torch.testing.assert_close(pos, flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_pos.reshape(5, 2), s_flat, rtol=1e-6, atol=1e-6)


ERRORS = {
    "batch dim": (dict(channel_dim=0), ValueError, "channel_dim cannot be the batch dim"),
    "out of range": (dict(channel_dim=4), ValueError, "channel_dim=4 is not a feature dim"),
    "negative out of range": (dict(channel_dim=-5), ValueError, "channel_dim=-5 is not a feature dim"),
    "flattened directions": (dict(directions=torch.randn(3, 210)), ValueError,
                             "per-position directions must be (K, C)"),
    "directions of another dim": (dict(channel_dim=2), ValueError, "(K, C) = (K, 5)"),
    "center of the flattened size": (dict(center=torch.zeros(210)), ValueError, "center must be (6,)"),
    "center per position": (dict(center=torch.zeros(6, 5, 7)), ValueError, "center must be (6,)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_named(case):
    change, exc, text = ERRORS[case]
    x, V, a, mu, tau, cd = make("nchw", torch.float32, "cpu")
    kw = dict(x=x, directions=V, alpha=a, center=mu, tau=tau, mode="clamp", channel_dim=cd)
    kw.update(change)
    with pytest.raises(exc, match=re.escape(text)):
        torch.ops.fire.repair(**kw)


# ----------------------------------------------------------------------------- autograd, opcheck


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("with_scores", [False, True])
def test_gradients_match_reference(backend, mode, layout, with_scores):
    x, V, a, mu, tau, cd = make(layout, torch.float32, backend, mode=mode)
    slope = make_slope(mode, 3, backend)
    ours, theirs = _leaves(x, V, a, mu, tau, slope), _leaves(x, V, a, mu, tau, slope)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(x.shape, generator=g).to(backend)
    w_sc = torch.randn(*lead_shape(x, cd), 3, generator=g).to(backend)
    if with_scores:
        out, sc = torch.ops.fire.repair_with_scores(*ours[:5], mode, cd, ours[5])
    else:
        out, sc = torch.ops.fire.repair(*ours[:5], mode, cd, ours[5]), None
    ((out * w_out).sum() + ((sc * w_sc).sum() if with_scores else 0)).backward()
    ref_out, ref_sc = fr.repair_reference(theirs[0].double(), *theirs[1:5], mode, channel_dim=cd, slope=theirs[5])
    ((ref_out * w_out.double()).sum() + ((ref_sc * w_sc.double()).sum() if with_scores else 0)).backward()
    for name, mine, ref in zip(["x", "directions", "alpha", "center", "tau", "slope"], ours, theirs, strict=True):
        if mine is None:
            continue
        expected = torch.zeros_like(mine) if ref.grad is None else ref.grad.to(mine.dtype)
        torch.testing.assert_close(mine.grad, expected, msg=name, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["repair", "repair_with_scores"])
def test_opcheck(op):
    for layout in ["nchw", "channels_last", "tokens", "row_strided"]:
        for mode in fr.MODES:
            x, V, a, mu, tau, cd = make(layout, torch.float32, "cpu", mode=mode)
            args = [t.requires_grad_() if t is not None else None for t in (x, V, a, mu, tau)]
            slope = make_slope(mode, 3, "cpu")
            slope = None if slope is None else slope.requires_grad_()
            torch.library.opcheck(getattr(torch.ops.fire, op).default, (*args, mode, cd, slope))
    x, V, a, mu, _, cd = make("nchw", torch.float32, "cpu", n=0, mode="project")
    torch.library.opcheck(getattr(torch.ops.fire, op).default, (x, V, a, mu, None, "project", cd))


def test_opcheck_backward_op():
    x, V, _, _, _, cd = make("nchw", torch.float32, "cpu")
    w = torch.rand(x.shape[0] * 5 * 7, 3)
    torch.library.opcheck(torch.ops.fire._repair_grad.default, (x, V, w, cd))


# ----------------------------------------------------------------------------- compile, export


class PositionRepaired(torch.nn.Module):
    """A conv map (either memory format) or a token tensor, repaired per position."""

    def __init__(self, mode, tokens=False, memory_format=torch.contiguous_format, with_scores=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 6 * 6, 5)
        self.mode, self.tokens, self.memory_format, self.with_scores = mode, tokens, memory_format, with_scores
        g = torch.Generator().manual_seed(3)
        self.register_buffer("V", torch.randn(2, 8, generator=g))
        self.register_buffer("alpha", torch.rand(2, generator=g))
        self.register_buffer("center", 0.1 * torch.randn(8, generator=g))
        self.register_buffer("tau", 0.1 * torch.rand(2, generator=g))
        self.register_buffer("slope", make_slope(mode, 2, "cpu"))

    def forward(self, x):
        h = self.conv(x.contiguous(memory_format=self.memory_format)).relu()
        cd = 1
        if self.tokens:
            h, cd = h.flatten(2).transpose(1, 2).contiguous(), -1
        tau = self.tau if self.mode == "clamp" else None
        h, s = torch.ops.fire.repair_with_scores(h, self.V, self.alpha, self.center, tau, self.mode, cd, self.slope)
        y = self.head(h.reshape(h.shape[0], -1))
        return (y, s) if self.with_scores else y


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("form", ["nchw", "nhwc", "tokens"])
def test_compile_fullgraph_dynamic_matches_eager(mode, form):
    fmt = torch.channels_last if form == "nhwc" else torch.contiguous_format
    check_compiled_matches_eager(PositionRepaired(mode, tokens=form == "tokens", memory_format=fmt).eval())


def test_compile_with_scores_and_backward():
    check_compiled_scores_and_grads(PositionRepaired("clamp", with_scores=True))


@pytest.mark.parametrize("tokens", [False, True])
def test_export_keeps_the_op(tokens):
    model = PositionRepaired("project", tokens=tokens).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 3, 6, 6),), dynamic_shapes={"x": {0: batch}})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "fire.repair_with_scores.default" in targets, targets
    x2 = torch.randn(9, 3, 6, 6)
    torch.testing.assert_close(ep.module()(x2), model(x2))
