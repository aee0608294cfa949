"""The C++ path of eager CPU calls (csrc/repair_op.cpp): which calls it takes, which it hands
to the Python implementation, and that both give the same answer bit for bit."""
import os
import re

import pytest
import torch
from torch.profiler import profile

import fire_repair as fr
from fire_repair import _ext

pytestmark = pytest.mark.skipif(not _ext.AVAILABLE, reason="the C++ extension is not built")


def fire_ops_called(fn) -> set:
    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fire::")}


def _prepared(layout):
    """Inputs as RepairModule holds them: fp32 contiguous directions and centre, laid out in
    x's memory order. Returns (x, directions, centre, channel_dim)."""
    g = torch.Generator().manual_seed(0)
    if layout == "flat":
        return torch.randn(3, 40, generator=g), torch.randn(2, 40, generator=g), torch.randn(40, generator=g), None
    if layout == "nchw":
        return (torch.randn(3, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g),
                torch.randn(4, 5, 6, generator=g), None)
    if layout == "channels_last":
        x = torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
        V = torch.randn(2, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
        mu = torch.randn(4, 5, 6, generator=g).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return x, V, mu, None
    if layout == "row_strided":
        return torch.randn(6, 40, generator=g)[::2], torch.randn(2, 40, generator=g), None, None
    if layout == "per_position_nchw":
        return torch.randn(3, 4, 5, 6, generator=g), torch.randn(2, 4, generator=g), torch.randn(4, generator=g), 1
    if layout == "tokens":
        return torch.randn(3, 7, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(4, generator=g), -1
    if layout == "empty":
        return torch.randn(0, 4, 5, generator=g), torch.randn(2, 4, generator=g), None, 1
    raise ValueError(layout)


LAYOUTS = ["flat", "nchw", "channels_last", "row_strided", "per_position_nchw", "tokens", "empty"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepared_calls_stay_in_cpp_and_match_python_bit_for_bit(use_backend, layout, mode, dtype):
    use_backend(None)
    x, V, mu, cd = _prepared(layout)
    x = x.to(dtype)
    a = torch.tensor([1.0, 0.5])
    tau = torch.tensor([0.1, -0.2]) if mode == "clamp" else None
    g = torch.tensor([-0.3, 0.2]) if mode == "invert" else None
    called = fire_ops_called(lambda: torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, g))
    assert called == {"fire::repair_with_scores"}, called
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, g)
    py_out, py_scores = torch.ops.fire._repair_with_scores_py(x, V, a, mu, tau, mode, cd, g)
    assert out.stride() == py_out.stride() and scores.shape == py_scores.shape
    assert torch.equal(out, py_out) and torch.equal(scores, py_scores)
    assert torch.equal(torch.ops.fire.repair(x, V, a, mu, tau, mode, cd, g), out)


@pytest.mark.parametrize("case", ["needs grad", "fp16 directions", "directions in another order", "x not dense",
                                  "FIRE_BACKEND=triton", "bad mode", "alpha of the wrong K"])
def test_other_calls_go_to_the_python_implementation(use_backend, case):
    use_backend(None)
    x, V, mu, cd = _prepared("nchw")
    a, mode = torch.ones(2), "project"
    if case == "needs grad":
        x = x.clone().requires_grad_()
    elif case == "fp16 directions":
        V = V.half()
    elif case == "directions in another order":
        x = x.contiguous(memory_format=torch.channels_last)  # V stays contiguous: a K*D permute
    elif case == "x not dense":
        x = torch.randn(3, 4, 5, 12)[..., ::2]
    elif case == "FIRE_BACKEND=triton":
        use_backend("triton")
    elif case == "bad mode":
        mode = "projct"
    else:
        a = torch.ones(3)
    call = lambda: torch.ops.fire.repair(x, V, a, mu, None, mode, cd)  # noqa: E731
    if case == "FIRE_BACKEND=triton" and os.environ.get("TRITON_INTERPRET") != "1":  # e.g. on a GPU machine
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # the Python path says what it needs
            call()
        return
    if case in ("bad mode", "alpha of the wrong K"):  # the Python checks name the argument
        expected = {"bad mode": "mode must be one of", "alpha of the wrong K": "alpha must be (K,) = (2,)"}[case]
        with pytest.raises(ValueError, match=re.escape(expected)):
            call()
        return
    assert "fire::_repair_py" in fire_ops_called(call)
    out = call()
    torch.testing.assert_close(out, fr.repair_reference(x, V, a, mu, None, mode)[0].to(out.dtype),
                               rtol=2e-3, atol=2e-3)


def test_gradients_through_the_cpp_entry_point():
    x, V, mu, _ = _prepared("nchw")
    x.requires_grad_()
    out = torch.ops.fire.repair(x, V, torch.ones(2), mu, None, "project")
    assert out.grad_fn is not None
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    fr.repair_reference(ref_x, V, torch.ones(2), mu, None, "project", compute_dtype=torch.float32)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)


def test_inference_mode_and_no_grad_take_the_cpp_path():
    x, V, mu, _ = _prepared("flat")
    xg = x.clone().requires_grad_()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert fire_ops_called(lambda: torch.ops.fire.repair(xg, V, torch.ones(2), mu, None, "shift")) == \
                {"fire::repair"}


def test_the_cpp_op_follows_the_one_backend_decision(use_backend):
    """The backend is decided once, in Python (fire_repair.ops.set_backend; at import, from
    FIRE_BACKEND); the C++ op reads that decision, never the environment per call."""
    from fire_repair.ops import backend_for, set_backend

    x, V, mu, _ = _prepared("flat")
    call = lambda: torch.ops.fire.repair(x, V, torch.ones(2), mu, None, "project")  # noqa: E731
    use_backend("cpu")
    assert fire_ops_called(call) == {"fire::repair"}
    os.environ["FIRE_BACKEND"] = "tpu"  # an edit of the environment is applied by set_backend() only
    assert fire_ops_called(call) == {"fire::repair"} and backend_for(x.device) == "native"
    assert set_backend() == "tpu"
    with pytest.raises(ValueError, match="FIRE_BACKEND"):  # both sides follow: the C++ op defers, Python names it
        call()
    with pytest.raises(ValueError, match="FIRE_BACKEND"):  # an unknown name given directly is refused at once
        set_backend("tpu")
    assert set_backend("cpu") == "cpu" and os.environ["FIRE_BACKEND"] == "cpu"
    assert fire_ops_called(call) == {"fire::repair"}
