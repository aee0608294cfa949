"""GPU-only checks: Triton and the CUDA C++ fallback against each other and the reference,
opcheck and torch.compile on CUDA, CUDA-graph capture. Skipped cleanly without a GPU; the
CPU-side suites also run every CUDA backend (see conftest.available_backends)."""
import pytest
import torch
from conftest import _cuda_native_available
from helpers import OUT_TOL, make_params, make_slope, make_x

import fire_repair as fr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 64, 32, 32), (7, 512, 4, 4), (1024, 640), (3, 300001)], ids=str)
def test_triton_and_cuda_fallback_agree(use_backend, mode, dtype, shape):
    if not _cuda_native_available():
        pytest.skip("the extension was built without CUDA")
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    V, a, mu, tau = make_params(x, 16, mode, "cuda")
    g = make_slope(mode, 16, "cuda")
    use_backend("triton")
    t_out, t_sc = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=g)
    use_backend("cuda")
    c_out, c_sc = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, slope=g)
    exact, ref_sc = fr.repair_reference(x.double(), V, a, mu, tau, mode, slope=g)
    rtol, atol = OUT_TOL[dtype]
    for out, sc in ((t_out, t_sc), (c_out, c_sc)):
        torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
        torch.testing.assert_close(sc, ref_sc, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("op", ["repair", "repair_with_scores"])
def test_opcheck_cuda(op):
    for mode in fr.MODES:
        x = make_x("channels_last", torch.float32, "cuda").requires_grad_()
        V, a, mu, tau = make_params(x, 3, mode, "cuda")
        g = make_slope(mode, 3, "cuda")
        torch.library.opcheck(getattr(torch.ops.fire, op).default, (x, V, a, mu, tau, mode, None, g))


def test_compile_cuda_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(64, 32, 8, 8, device="cuda")
    V, a, mu, tau = make_params(x, 4, "clamp", "cuda")

    def f(h):
        return torch.ops.fire.repair(h.relu(), V, a, mu, tau, "clamp") * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (64, 100):
        h = torch.randn(n, 32, 8, 8, device="cuda")
        torch.testing.assert_close(compiled(h), f(h))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(use_backend, backend):
    if backend == "cuda" and not _cuda_native_available():
        pytest.skip("the extension was built without CUDA")
    use_backend(backend)
    x = torch.randn(32, 64, 16, 16, device="cuda")
    V, a, mu, tau = make_params(x, 4, "clamp", "cuda")
    torch.ops.fire.repair(x, V, a, mu, tau, "clamp")  # warm-up: compiles kernels, checks values
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = torch.ops.fire.repair(x, V, a, mu, tau, "clamp")
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = fr.repair_reference(x, V, a, mu, tau, "clamp", compute_dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# (logical shape, memory format, channel_dim): conv maps both ways, tokens, 1x1 maps, a wide C
POSITION_SHAPES = [
    ((256, 64, 32, 32), torch.contiguous_format, 1),
    ((256, 64, 32, 32), torch.channels_last, 1),
    ((64, 197, 384), None, -1),
    ((512, 2048, 1, 1), torch.contiguous_format, 1),
    ((2, 20000, 3, 5), torch.contiguous_format, 1),
]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,fmt,cd", POSITION_SHAPES, ids=[f"{s}-{f}" for s, f, _ in POSITION_SHAPES])
def test_per_position_backends_agree(use_backend, mode, dtype, shape, fmt, cd):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = x.shape[cd]
    g = torch.Generator().manual_seed(0)
    V = (torch.randn(8, C, generator=g) / C**0.5).cuda()
    a, mu = torch.rand(8, generator=g).cuda(), (0.1 * torch.randn(C, generator=g)).cuda()
    tau = torch.rand(8, generator=g).cuda() if mode == "clamp" else None
    slope = make_slope(mode, 8, "cuda")
    exact, ref_sc = fr.repair_reference(x.double(), V, a, mu, tau, mode, channel_dim=cd, slope=slope)
    backends = ["triton"] + (["cuda"] if _cuda_native_available() else [])
    for backend in backends:
        use_backend(backend)
        out, sc = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, slope)
        # the same memory layout (strides of size-1 dims carry no meaning)
        assert [st for st, n in zip(out.stride(), x.shape, strict=True) if n > 1] == \
            [st for st, n in zip(x.stride(), x.shape, strict=True) if n > 1], backend
        torch.testing.assert_close(out.double(), exact, rtol=OUT_TOL[dtype][0], atol=OUT_TOL[dtype][1], msg=backend)
        torch.testing.assert_close(sc, ref_sc, rtol=1e-3, atol=1e-3, msg=backend)


def test_opcheck_cuda_per_position():
    for mode in fr.MODES:
        x = torch.randn(4, 8, 5, 7, device="cuda", requires_grad=True)
        V, a = torch.randn(3, 8, device="cuda"), torch.rand(3, device="cuda")
        mu, tau = torch.randn(8, device="cuda"), torch.rand(3, device="cuda") if mode == "clamp" else None
        slope = make_slope(mode, 3, "cuda")
        torch.library.opcheck(torch.ops.fire.repair_with_scores.default, (x, V, a, mu, tau, mode, 1, slope))


def _cpp_cuda_path_registered() -> bool:
    return _cuda_native_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fire::repair", "CUDA")


@pytest.mark.parametrize("serves", ["cuda", "auto-without-triton"])
@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("layout", ["flat", "nchw", "channels_last", "per_position_nchw", "tokens", "empty"])
def test_cuda_native_calls_stay_in_cpp_and_match_python(monkeypatch, use_backend, layout, mode, serves):
    """Eager CUDA calls that the CUDA C++ kernel serves (FIRE_BACKEND=cuda, or auto where Triton
    is missing) go from the C++ op straight to the kernel, with the Python twin's result bit for bit."""
    from test_op_fast_path import _prepared, fire_ops_called

    from fire_repair.ops import set_backend
    if not _cpp_cuda_path_registered():
        pytest.skip("the extension was built without CUDA")
    x, V, mu, cd = _prepared(layout)
    x, V, mu = x.cuda(), V.cuda(), None if mu is None else mu.cuda()  # .cuda() keeps the strides
    a = torch.tensor([1.0, 0.5], device="cuda")
    tau = torch.tensor([0.1, -0.2], device="cuda") if mode in ("clamp", "gated", "invert") else None
    g = torch.tensor([-0.3, 0.2], device="cuda") if mode == "invert" else None
    if serves == "cuda":
        use_backend("cuda")
    else:  # the one backend decision, made as where Triton is missing: the C++ op and the twin follow it
        monkeypatch.setattr("fire_repair._op.backend.HAVE_TRITON", False)
        use_backend(None)
    try:
        called = fire_ops_called(lambda: torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, g))
        out, sc = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, g)
        py_out, py_sc = torch.ops.fire._repair_with_scores_py(x, V, a, mu, tau, mode, cd, g)
    finally:
        monkeypatch.undo()  # Triton back where it is installed, and the decision made again with it
        set_backend()
    assert called == {"fire::repair_with_scores"}, called
    assert torch.equal(out, py_out) and torch.equal(sc, py_sc)


def test_cuda_calls_go_to_triton_where_it_serves(use_backend):
    from test_op_fast_path import fire_ops_called

    import fire_kernels
    if not (_cpp_cuda_path_registered() and fire_kernels.HAVE_TRITON):
        pytest.skip("needs the CUDA build and Triton")
    use_backend(None)
    x = torch.randn(3, 40, device="cuda")
    V, a = torch.randn(2, 40, device="cuda"), torch.ones(2, device="cuda")
    called = fire_ops_called(lambda: torch.ops.fire.repair(x, V, a, None, None, "project"))
    assert "fire::_repair_py" in called, called
