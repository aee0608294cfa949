"""The op inside models under torch.compile(fullgraph=True, dynamic=True) and torch.export."""
import pytest
import torch
from helpers import check_compiled_matches_eager, check_compiled_scores_and_grads, make_params

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
