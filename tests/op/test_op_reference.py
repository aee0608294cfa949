"""Every backend against the plain PyTorch reference: modes, K, dtypes, layouts, sizes, N=0."""
import os

import pytest
import torch
from helpers import OUT_TOL, SCORE_TOL, make_params, make_slope, make_x

import fire_repair as fr

LAYOUTS = ["2d", "4d", "channels_last", "transposed", "strided", "row_strided", "3d"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(out, scores, x, V, a, mu, tau, mode, slope=None):
    ref_out, ref_scores = fr.repair_reference(x, V, a, mu, tau, mode, compute_dtype=torch.float64, slope=slope)
    # against the exact (fp64, unrounded) answer: the output may differ by the final rounding
    exact, _ = fr.repair_reference(x.double(), V, a, mu, tau, mode, slope=slope)
    rtol, atol = OUT_TOL[x.dtype]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
    if scores is not None:
        assert scores.shape == (x.shape[0], V.shape[0]) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, ref_scores, rtol=SCORE_TOL[0], atol=SCORE_TOL[1])
    return ref_out


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(backend, mode, k, dtype, layout):
    x = make_x(layout, dtype, backend)
    V, a, mu, tau = make_params(x, k, mode, backend)
    g = make_slope(mode, k, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=g)
    _check(out, scores, x, V, a, mu, tau, mode, g)
    out_only = torch.ops.fire.repair(x, V, a, mu, tau, mode, slope=g)
    torch.testing.assert_close(out_only, out, rtol=0, atol=0)


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("k", [5, 16, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows_many_directions(backend, mode, k, dtype):
    """The CPU kernel's row blocks at K > 4 (32 rows, the last one ragged), its chunks (256
    elements at K = 16, 224 at 17), the K % 4 directions left over and D % 8 tail elements."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(70, 1029, generator=g).to(backend, dtype)
    V, a, mu, tau = make_params(x, k, mode, backend)
    slope = make_slope(mode, k, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=slope)
    _check(out, scores, x, V, a, mu, tau, mode, slope)


@pytest.mark.parametrize("layout", ["4d", "channels_last", "transposed", "strided", "row_strided"])
def test_output_keeps_memory_format(backend, layout):
    x = make_x(layout, torch.float32, backend)
    V, a, mu, _ = make_params(x, 2, "project", backend)
    out = torch.ops.fire.repair(x, V, a, mu, None, "project")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        assert out.stride() == torch.empty_like(x).stride()
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("mode", fr.MODES)
def test_directions_in_feature_shape(backend, mode):
    x = make_x("channels_last", torch.float32, backend)
    V, a, mu, tau = make_params(x, 3, mode, backend, directions_shape="full")
    g = make_slope(mode, 3, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=g)
    _check(out, scores, x, V, a, mu, tau, mode, g)


@pytest.mark.parametrize("n", [0, 1, 2, 33, 70])
@pytest.mark.parametrize("mode", fr.MODES)
def test_batch_sizes(backend, n, mode):
    x = make_x("2d", torch.float32, backend, n=n)
    V, a, mu, tau = make_params(x, 3, mode, backend)
    g = make_slope(mode, 3, backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=g)
    assert out.shape == (n, 37) and scores.shape == (n, 3)
    _check(out, scores, x, V, a, mu, tau, mode, g)


# D from 1 to 2^18: odd sizes, both sides of the fused/split boundary of the Triton kernels.
@pytest.mark.parametrize("D", [1, 2, 7, 100, 1000, 4097, 16384, 16385, 65537, 2**18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_lengths(backend, D, dtype):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, D, generator=g).to(backend, dtype)
    V = (torch.randn(3, D, generator=g) / D**0.5).to(backend)
    a = torch.rand(3, generator=g).to(backend)
    mu = (0.1 * torch.randn(D, generator=g)).to(backend)
    tau = (0.1 * torch.rand(3, generator=g)).to(backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "clamp")
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, "clamp")
    rtol, atol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-3)


# invert keeps rows up to 8192 in the fused kernel (fire_kernels.blocks.fused_max_d): both sides
@pytest.mark.parametrize("D", [8192, 8193, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_invert_row_lengths(backend, D, dtype):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, D, generator=g).to(backend, dtype)
    V = (torch.randn(2, D, generator=g) / D**0.5).to(backend)
    a, mu = torch.rand(2, generator=g).to(backend), (0.1 * torch.randn(D, generator=g)).to(backend)
    tau, slope = torch.tensor([-0.5, 0.0], device=backend), torch.tensor([-0.3, 0.2], device=backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "invert", slope=slope)
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, "invert", slope=slope)
    rtol, atol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-3)
    gated = torch.ops.fire.repair(x, V, a, mu, tau, "gated")
    assert (out != gated).any()  # some row was flagged and rescaled


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter")
@pytest.mark.parametrize("mode,K", [("clamp", 16), ("gated", 40), ("project", 1), ("shift", 3), ("invert", 5)])
def test_long_rows_at_the_gpu_block_sizes_under_the_interpreter(monkeypatch, mode, K):
    """The row-block x D-chunk kernels (rows longer than FUSED_MAX_D) at the chunk a GPU uses;
    under the interpreter they otherwise run one chunk per span (fast, the same code)."""
    from fire_kernels import repair
    from fire_kernels.blocks import FUSED_MAX_D
    from fire_kernels.modes import Mode

    monkeypatch.setattr(repair, "_interpreted", lambda: False)
    g = torch.Generator().manual_seed(K)
    D = FUSED_MAX_D + 5  # five spans, the last one ragged
    assert repair.row_block_blocks(D, K)[3] == 4096
    x = torch.randn(35, D, generator=g)  # two row blocks, the second ragged
    V = torch.randn(K, D, generator=g) / D**0.5
    a, mu, tau = torch.rand(35, K, generator=g), 0.1 * torch.randn(D, generator=g), 0.1 * torch.rand(K, generator=g)
    tau = tau if mode in fr.TAU_MODES else None
    slope = make_slope(mode, K, "cpu")
    out, scores = repair.repair_rows(x[:, None], V, a, mu, tau, int(Mode.parse(mode)), True, slope)
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, mode, slope=slope)
    torch.testing.assert_close(out[:, 0].double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-3)


def test_shift_is_a_constant_offset(backend):
    x = make_x("4d", torch.float32, backend)
    V, a, _, _ = make_params(x, 2, "shift", backend)
    out = torch.ops.fire.repair(x, V, a, None, None, "shift")
    offset = (a[:, None] * V).sum(0).reshape(x.shape[1:])
    torch.testing.assert_close(out, x - offset, rtol=1e-6, atol=1e-6)


def test_clamp_leaves_samples_below_tau_untouched(backend):
    x = make_x("2d", torch.float32, backend, n=8)
    V, a, mu, _ = make_params(x, 2, "clamp", backend)
    tau = torch.full((2,), 1e6, device=backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "clamp")
    assert torch.equal(out, x)
    tau = torch.full((2,), float("inf"), device=backend)  # inf means "never repair"
    assert torch.equal(torch.ops.fire.repair(x, V, a, mu, tau, "clamp"), x)


def test_gated_shifts_exactly_the_rows_above_tau(backend):
    x = make_x("2d", torch.float32, backend, n=16)
    V, a, mu, _ = make_params(x, 2, "gated", backend)
    c = (x - mu) @ V.T
    s = c.sort(0).values
    tau = (s[7] + s[8]) / 2  # half the rows above each threshold, none near it
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "gated")
    gate = (c > tau).float()
    torch.testing.assert_close(out, x - (gate * a) @ V, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, c, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[gate.sum(1) == 0], x[gate.sum(1) == 0])  # below every tau: untouched
    inf = torch.full((2,), float("inf"), device=backend)
    assert torch.equal(torch.ops.fire.repair(x, V, a, mu, inf, "gated"), x)


def test_parameter_dtypes_are_accepted(backend):
    x = make_x("2d", torch.bfloat16, backend)
    V, a, mu, tau = make_params(x, 3, "clamp", backend)
    out = torch.ops.fire.repair(x, V.bfloat16(), a.half(), mu.bfloat16(), tau, "clamp")
    ref, _ = fr.repair_reference(x, V.bfloat16(), a.half(), mu.bfloat16(), tau, "clamp")
    torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1.6e-2)


def _blend(backend, cd):
    """Clean rows, the same rows blended with a pattern (x' = (1 - lam) x + lam p), and the
    invert repair that undoes it: beta = lam (p - mu), slope -lam, tau between the two sides."""
    g = torch.Generator().manual_seed(9)
    if cd is None:
        x = torch.randn(12, 3, 4, 5, generator=g)
        p = 3.0 + torch.randn(3, 4, 5, generator=g)
    else:  # per position: channels of every position blended with one channel pattern
        x = torch.randn(4, 6, 3, 5, generator=g)
        p = (20.0 + torch.randn(6, generator=g))[:, None, None]
    lam = 0.25
    blended = (1 - lam) * x + lam * p
    rows = x.reshape(-1, 60) if cd is None else x.movedim(1, -1).reshape(-1, 6)
    mu = rows.mean(0)
    beta = lam * (p.reshape(-1) - mu)
    brows = blended.reshape(-1, 60) if cd is None else blended.movedim(1, -1).reshape(-1, 6)
    clean_max, blended_min = ((rows - mu) @ beta).max(), ((brows - mu) @ beta).min()
    assert clean_max < blended_min
    tau = ((clean_max + blended_min) / 2).reshape(1)  # between the clean and the blended rows
    args = (beta[None].to(backend), torch.ones(1, device=backend), mu.to(backend), tau.to(backend), "invert", cd)
    return x.to(backend), blended.to(backend), args, torch.tensor([-lam], device=backend)


@pytest.mark.parametrize("cd", [None, 1], ids=["flattened", "per-position"])
def test_invert_undoes_a_blend_and_leaves_clean_rows_untouched(backend, cd):
    x, blended, args, slope = _blend(backend, cd)
    out, scores = torch.ops.fire.repair_with_scores(blended, *args, slope)
    assert (scores > args[3]).all()  # every blended row flagged
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)  # the clean rows back, not shifted blends
    gated = torch.ops.fire.repair(blended, *args[:4], "gated", cd)
    assert (gated - x).abs().max() > 0.1  # the shift alone cannot undo the blend's scaling
    assert torch.equal(torch.ops.fire.repair(x, *args, slope), x)  # no clean row flagged: bit for bit


@pytest.mark.parametrize("mode_args", [(None,), ()], ids=["slope None", "no slope"])
def test_invert_without_a_slope_is_gated_bit_for_bit(backend, mode_args):
    x = make_x("4d", torch.float32, backend, n=16)
    V, a, mu, tau = make_params(x, 3, "invert", backend)
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "invert", None, *mode_args)
    want, want_scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "gated")
    assert torch.equal(out, want) and torch.equal(scores, want_scores)
