"""Hardening, round two: one semantics for non-finite values on every path.

The documented semantics (fire_repair.ops): plain IEEE arithmetic, exactly as the reference
computes it: out = x - sum_k w_k v_k over *every* direction (a weight of 0 times an inf or NaN
direction is NaN), and invert's share u = h / (1 + h), h = sum_k w_k g_k over every direction
(0 * NaN slope is NaN); only a share of exactly 0 leaves the row as t. The grid below puts one
NaN / +inf / -inf into each argument of each mode, with every row flagged or none, in both
forms and both memory formats, and checks every CPU path against the fp64 reference: the
C++ kernel (row and tile paths, the C++ fast path and the Python twin), the plain maths that
small calls compile to under torch.compile, and the Triton kernels under the interpreter."""
import itertools
import os

import pytest
import torch

import fire_kernels
import fire_repair  # noqa: F401  (registers the ops)
from fire_kernels.modes import MODES, SLOPE_MODES, TAU_MODES
from fire_repair._op import inline, validate
from fire_repair._op import layout as rows
from fire_repair.reference import repair_reference

VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _params(mode):
    out = ["x", "directions", "alpha", "center"]
    if mode in TAU_MODES:
        out.append("tau")
    if mode in SLOPE_MODES:
        out.append("slope")
    return out


def _grid():
    cases = []
    for mode in MODES:
        flags = (False, True) if mode in TAU_MODES else (False,)
        for param, val, flagged, form, layout in itertools.product(
                _params(mode), VALUES, flags, ("flattened", "per_position"), ("contiguous", "channels_last")):
            cases.append((mode, param, val, flagged, form, layout))
    return cases


GRID = _grid()


def _case(mode, param, val, flagged, form, layout):
    """The arguments of one grid case: K = 2, alpha = (0, 1) so that direction 0 has weight 0
    (where skipping it would hide a 0 * inf), the bad value at element 0 of `param`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 2, 2, generator=g)
    cd = 1 if form == "per_position" else None
    V = torch.randn(2, 8, generator=g) if cd else torch.randn(2, 8, 2, 2, generator=g)
    mu = 0.1 * torch.randn(V.shape[1:], generator=g)
    a = torch.tensor([0.0, 1.0])
    tau = torch.full((2,), -1e3 if flagged else 1e3) if mode in TAU_MODES else None
    slope = torch.tensor([-0.2, 0.3]) if mode in SLOPE_MODES else None
    args = {"x": x, "directions": V, "alpha": a, "center": mu, "tau": tau, "slope": slope}
    args[param].view(-1)[0] = VALUES[val]
    if layout == "channels_last":
        args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
        if cd is None:  # directions laid out as RepairModule keeps them: the C++ fast path
            args["directions"] = args["directions"].contiguous(memory_format=torch.channels_last)
    return args, cd


def _check(out, scores, args, mode, cd, what):
    ref, ref_scores = repair_reference(args["x"], args["directions"], args["alpha"], args["center"], args["tau"],
                                       mode, channel_dim=cd, slope=args["slope"])
    o, r = out.double(), ref.double()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(o), torch.isinf(r)), f"{what}: inf pattern differs from the reference"
    torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, equal_nan=True, msg=what)
    if scores is not None:
        assert torch.equal(torch.isnan(scores), torch.isnan(ref_scores)), f"{what}: score NaNs differ"
        torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4, equal_nan=True, msg=what)


def _call(args, mode, cd, scores):
    a = (args["x"], args["directions"], args["alpha"], args["center"], args["tau"], mode, cd, args["slope"])
    if scores:
        return torch.ops.fire.repair_with_scores(*a)
    return torch.ops.fire.repair(*a), None


def _run_grid(use_backend, backend_env, cases, with_scores=(False, True)):
    use_backend(backend_env)
    for case in cases:
        mode, param, val, flagged, form, layout = case
        args, cd = _case(*case)
        for scores in with_scores:
            out, c = _call(args, mode, cd, scores)
            _check(out, c, args, mode, cd, f"{backend_env} {case} scores={scores}")
            assert out.stride() == args["x"].stride() or form == "per_position"


def test_grid_size():
    assert len(GRID) == 480


def test_nonfinite_grid_cpu_kernel(use_backend):
    """Eager CPU (the C++ fast path, row and tile kernels): every case as the reference."""
    _run_grid(use_backend, "cpu", GRID)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_grid_cpu_kernel_half_precision_x(use_backend, dtype):
    """The same cases with x in bf16 / fp16 (the kernel converts in registers and copies
    untouched rows raw): the same NaN and inf pattern as the reference on that x."""
    use_backend("cpu")
    for case in GRID:
        mode, param, val, flagged, form, layout = case
        args, cd = _case(*case)
        args["x"] = args["x"].to(dtype)
        out = torch.ops.fire.repair(args["x"], args["directions"], args["alpha"], args["center"], args["tau"], mode,
                                    cd, args["slope"])
        ref = repair_reference(args["x"], args["directions"], args["alpha"], args["center"], args["tau"], mode,
                               channel_dim=cd, slope=args["slope"])[0]
        assert out.dtype == dtype
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{dtype} {case}: NaN pattern differs"
        assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"{dtype} {case}: inf pattern differs"
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2, equal_nan=True, msg=str(case))


def test_nonfinite_grid_python_twin(use_backend):
    """The same cases through the Python twin (what gradients, copies and odd dtypes take)."""
    use_backend("cpu")
    for case in GRID:
        mode, param, val, flagged, form, layout = case
        args, cd = _case(*case)
        out, c = torch.ops.fire._repair_with_scores_py(args["x"], args["directions"], args["alpha"], args["center"],
                                                        args["tau"], mode, cd, args["slope"])
        _check(out, c, args, mode, cd, f"python twin {case}")


def test_nonfinite_grid_compiled_inline_maths():
    """What small calls compile to under torch.compile on the CPU (`_op.inline.inline_rows`), on the
    rows the op lays out: every case as the reference."""
    for case in GRID:
        mode, param, val, flagged, form, layout = case
        args, cd = _case(*case)
        x = args["x"]
        mode_id, a, t, cdn, g = validate.validate(x, args["directions"], args["alpha"], args["center"], args["tau"],
                                              mode, cd, args["slope"])
        if cdn is None:
            x3, perm, restore = rows.flat_rows(x)
            feat = list(x.shape[1:])
            V = rows.in_order(args["directions"], 2, feat, perm)
            mu = rows.in_order(args["center"], 0, feat, perm)
            lead = [x.shape[0]]
        else:
            x3, restore = rows.position_rows(x, cdn)
            V, mu = args["directions"].float().contiguous(), args["center"].float().contiguous()
            lead = [s for d, s in enumerate(x.shape) if d != cdn]
        out3, c = inline.inline_rows(x3, V, a, mu, t, mode_id, True, g)
        _check(restore(out3), c.reshape(*lead, 2), args, mode, cd, f"inline {case}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.skipif(not (fire_kernels.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton and TRITON_INTERPRET=1")
def test_nonfinite_grid_triton_interpreted(use_backend):
    """The Triton kernels under the interpreter: slow per call, so one layout per form (the
    kernels take rows at any stride; the layouts differ only in the strides they are given),
    NaN everywhere and +inf in the directions and slope (what a zero weight multiplies), with
    scores (the same kernel writes out with or without them)."""
    cases = [c for c in GRID if (c[5] == "channels_last") == (c[4] == "flattened")
             and (c[2] == "nan" or (c[2] == "inf" and c[1] in ("directions", "slope")))]
    _run_grid(use_backend, "triton", cases, with_scores=(True,))


# The examples of the issue, verbatim.

def test_issue_example_invert_nan_slope_unflagged_channels_last_is_nan_as_contiguous():
    x = torch.randn(2, 8, 2, 2)
    V = torch.randn(2, 8)
    a = torch.ones(2)
    t = torch.full((2,), 1e3)
    s = torch.tensor([float("nan"), 0.0])
    op = torch.ops.fire.repair
    ref = repair_reference(x, V, a, None, t, "invert", 1, slope=s)[0]
    assert torch.isnan(ref).all()
    assert torch.isnan(op(x, V, a, None, t, "invert", 1, s)).all()
    assert torch.isnan(op(x.contiguous(memory_format=torch.channels_last), V, a, None, t, "invert", 1, s)).all()


def test_issue_example_shift_zero_alpha_inf_direction():
    V2 = torch.randn(2, 4)
    V2[0, 0] = float("inf")
    x = torch.randn(3, 4)
    a = torch.tensor([0.0, 1.0])
    out = torch.ops.fire.repair(x, V2, a, None, None, "shift")
    ref = repair_reference(x, V2, a, None, None, "shift")[0]
    assert int(torch.isnan(ref).sum()) == 3
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.slow
@pytest.mark.parametrize("big", [False, True], ids=["inline", "kernel"])
def test_torch_compile_follows_the_same_semantics(big):
    """Compiled: small calls become plain maths, large ones keep the C++ kernel; both as eager."""
    n = 600 if big else 2
    x = torch.randn(n, 8, 2, 2)
    V = torch.randn(2, 8, 2, 2)
    V[0, 0, 0, 0] = float("inf")
    a, mu = torch.tensor([0.0, 1.0]), torch.zeros(8, 2, 2)
    s, t = torch.tensor([float("nan"), 0.0]), torch.full((2,), 1e3)
    torch._dynamo.reset()

    def f(x, V, a, mu, t, s):
        return (torch.ops.fire.repair(x, V, a, mu, None, "shift"),
                torch.ops.fire.repair(x, V.abs().clamp_max(1.0), a, mu, t, "invert", None, s))

    got = torch.compile(f, fullgraph=True, dynamic=False)(x, V, a, mu, t, s)
    ref = (repair_reference(x, V, a, mu, None, "shift")[0],
           repair_reference(x, V.abs().clamp_max(1.0), a, mu, t, "invert", slope=s)[0])
    for o, r in zip(got, ref, strict=True):
        assert torch.equal(torch.isnan(o), torch.isnan(r))
        assert torch.isnan(o).any()
