"""The op inside models under torch.compile(fullgraph=True, dynamic=True) and torch.export."""
import pytest
import torch
from helpers import make_params

import fire_repair as fr


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

    def forward(self, x):
        h = self.conv(x.contiguous(memory_format=self.memory_format)).relu()
        tau = self.tau if self.mode == "clamp" else None
        if self.with_scores:
            h, s = torch.ops.fire.repair_with_scores(h, self.V, self.alpha, self.center, tau, self.mode)
            return self.head(h.flatten(1)), s
        return self.head(torch.ops.fire.repair(h, self.V, self.alpha, self.center, tau, self.mode).flatten(1))


@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compile_fullgraph_dynamic_matches_eager(mode, memory_format):
    torch._dynamo.reset()
    model = Repaired(mode, memory_format=memory_format).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        # all >= 16: CPU conv fakes guard on batch < 16; 17 equals no static dim (duck sizing)
        for i, n in enumerate([17, 33, 64]):
            x = torch.randn(n, 3, 6, 6)
            # after the first call, a new batch size must not recompile
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(x)
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_compile_with_scores_and_backward():
    torch._dynamo.reset()
    model = Repaired("clamp", with_scores=True)
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
    for p in model.parameters():
        assert p.grad is not None


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
