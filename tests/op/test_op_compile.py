"""The op inside models under torch.compile(fullgraph=True, dynamic=True) and torch.export."""
import pytest
import torch
from helpers import check_compiled_matches_eager, check_compiled_scores_and_grads, make_params, make_slope

import fire_repair as fr
from fire_repair._op import inline


class Repaired(torch.nn.Module):
    def __init__(self, mode, with_scores=False, memory_format=torch.contiguous_format):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)
        self.mode, self.with_scores, self.memory_format = mode, with_scores, memory_format
        h = torch.zeros(1, 4, 6, 6)
        V, a, mu, tau = make_params(h, 3, mode, "cpu", seed=3)
        self.register_buffer("V", V * 6)
        self.register_buffer("alpha", a)
        self.register_buffer("center", mu)
        self.register_buffer("tau", tau if tau is not None else torch.zeros(0))
        self.register_buffer("slope", make_slope(mode, 3, "cpu"))

    def forward(self, x):
        h = self.conv(x.contiguous(memory_format=self.memory_format)).relu()
        tau = self.tau if self.mode == "clamp" else None
        if self.with_scores:
            h, s = torch.ops.fire.repair_with_scores(h, self.V, self.alpha, self.center, tau, self.mode,
                                                     slope=self.slope)
            return self.head(h.flatten(1)), s
        return self.head(torch.ops.fire.repair(h, self.V, self.alpha, self.center, tau, self.mode,
                                               slope=self.slope).flatten(1))


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compile_fullgraph_dynamic_matches_eager(mode, memory_format):
    check_compiled_matches_eager(Repaired(mode, memory_format=memory_format).eval())


def test_compile_with_scores_and_backward():
    check_compiled_scores_and_grads(Repaired("clamp", with_scores=True))


@pytest.mark.parametrize("op_name", ["repair", "repair_with_scores"])
def test_export_keeps_the_op(op_name):
    model = Repaired("project", with_scores=op_name == "repair_with_scores").eval()
    x = torch.randn(4, 3, 6, 6)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert f"fire.{op_name}.default" in targets, targets
    x2 = torch.randn(9, 3, 6, 6)
    torch.testing.assert_close(ep.module()(x2), model(x2))


# ----------------------------------------------------------------------------- small inputs
# Under torch.compile on the CPU, calls of at most fr.ops.COMPILE_INLINE_WORK elements x
# directions (static sizes) compile to the plain maths instead of a call of the C++ kernel.

def _forward_graph_targets(fn, *args):
    """The call targets of the forward graph AOTAutograd hands to the compiler, and fn's result."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True, dynamic=False)(*args)
    return seen, out


SMALL = [  # (shape, channel_dim, memory format)
    ((2, 96), None, None), ((1, 8, 4, 4), None, torch.channels_last),
    ((2, 8, 3, 5), 1, None), ((2, 8, 3, 5), 1, torch.channels_last), ((1, 7, 12), 2, None)]


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"{c[0]}-cd{c[1]}-{'nhwc' if c[2] else 'dense'}")
def test_small_inputs_compile_to_the_plain_maths(case, dtype, mode):
    shape, cd, fmt = case
    x = torch.randn(shape).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    D = shape[cd] if cd is not None else x[0].numel()
    V, a, mu, tau = make_params(torch.zeros(1, D), 3, mode, "cpu", seed=5)
    slope = make_slope(mode, 3, "cpu")
    for op in (torch.ops.fire.repair, torch.ops.fire.repair_with_scores):
        targets, got = _forward_graph_targets(lambda *t, op=op: op(*t[:5], mode, cd, t[5]), x, V * 4, a, mu, tau,
                                              slope)
        assert "fire._repair_native.default" not in targets, targets
        want = op(x, V * 4, a, mu, tau, mode, cd, slope)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
            tol = 2e-2 if g.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_larger_inputs_keep_the_kernel_under_compile():
    K = 4
    n = fr.ops.COMPILE_INLINE_WORK // K + 1  # one element over
    x = torch.randn(1, n)
    V, a, mu, tau = make_params(x, K, "clamp", "cpu")
    targets, got = _forward_graph_targets(lambda *t: torch.ops.fire.repair(*t, "clamp"), x, V, a, mu, tau)
    assert "fire._repair_native.default" in targets, targets
    torch.testing.assert_close(got, torch.ops.fire.repair(x, V, a, mu, tau, "clamp"))
    small = x[:, : n - 1]
    targets, _ = _forward_graph_targets(lambda *t: torch.ops.fire.repair(*t, "clamp"), small, V[:, : n - 1], a,
                                        mu[: n - 1], tau)
    assert "fire._repair_native.default" not in targets, targets


def test_small_inputs_inline_only_under_compile():
    """Eager calls of any size take the C++ kernel (the C++ entry point: no Python on the way)."""
    assert not inline.inline_under_compile(torch.zeros(1, 1, 8), 1)


@pytest.mark.parametrize("cd", [None, 1])
def test_small_inputs_under_compile_keep_the_gradients(cd):
    x = torch.randn(2, 6, 5, requires_grad=True)
    D = 6 if cd == 1 else 30
    V, a, mu, tau = make_params(torch.zeros(1, D), 2, "clamp", "cpu", seed=7)
    V = (4 * V).requires_grad_()

    def f(x, V):
        out, s = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, "clamp", cd)
        return (out ** 2).sum() + s.sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, dynamic=False)(x, V), (x, V))
    want = torch.autograd.grad(f(x, V), (x, V))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- on-disk caches

def test_importing_tags_the_compile_caches_with_the_traced_sources():
    from fire_repair import compile_cache

    tag = compile_cache.source_tag()
    assert tag in torch.compiler.config.cache_key_tag.split(",")
    assert any(p.name == "ops.py" for p in compile_cache.TRACED_SOURCES)


def test_the_tag_follows_the_sources_and_keeps_the_users(tmp_path):
    from fire_repair import compile_cache

    src = tmp_path / "ops.py"
    src.write_text("x = 1\n")
    before = compile_cache.source_tag([src])
    src.write_text("x = 2\n")
    assert compile_cache.source_tag([src]) != before
    with torch.compiler.config.patch(cache_key_tag="mine"):
        compile_cache.tag_compile_caches(before)
        compile_cache.tag_compile_caches(before)  # once
        assert torch.compiler.config.cache_key_tag == f"mine,{before}"


def test_a_new_tag_misses_the_warm_caches(tmp_path, monkeypatch):
    """What the tag is for: the same graph compiled again is served from the on-disk caches,
    but not once the tag (the traced sources) differs."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 64)
    V, a, mu, tau = make_params(x, 2, "clamp", "cpu")

    def hits():
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(lambda *t: torch.ops.fire.repair(*t, "clamp"), fullgraph=True, dynamic=False)
        fn(x, V, a, mu, tau)
        return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]

    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        hits()  # warms the caches
        assert hits() > 0
        with torch.compiler.config.patch(cache_key_tag=torch.compiler.config.cache_key_tag + ",edited"):
            assert hits() == 0
