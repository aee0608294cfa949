"""Bad input raises a clear error that names the argument; nothing is broadcast."""
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_params, make_x

import fire_repair as fr


def _args(mode="clamp"):
    x = make_x("4d", torch.float32, "cpu")
    V, a, mu, tau = make_params(x, 3, mode, "cpu")
    return dict(x=x, directions=V, alpha=a, center=mu, tau=tau, mode=mode)


def _call(**kw):
    return torch.ops.fire.repair(kw["x"], kw["directions"], kw["alpha"], kw["center"], kw["tau"], kw["mode"],
                                 slope=kw.get("slope"))


CASES = {
    "unknown mode": (dict(mode="projct"), ValueError, "mode"),
    "integer x": (dict(x=torch.zeros(5, 3, 5, 7, dtype=torch.int32)), TypeError, "x must be"),
    "float64 x": (dict(x=torch.zeros(5, 3, 5, 7, dtype=torch.float64)), TypeError, "x must be"),
    "0-d x": (dict(x=torch.tensor(1.0)), ValueError, "x must be (N, ...)"),
    "directions of the wrong D": (dict(directions=torch.randn(3, 104)), ValueError, "directions must be"),
    "directions of the wrong feature shape": (dict(directions=torch.randn(3, 3, 7, 5)), ValueError, "directions"),
    "directions without K": (dict(directions=torch.randn(105)), ValueError, "directions"),
    "too many directions": (dict(directions=torch.randn(65, 105), alpha=torch.ones(65), tau=torch.ones(65)),
                            ValueError, "directions must hold"),
    "alpha of the wrong K": (dict(alpha=torch.ones(2)), ValueError, "alpha must be"),
    "scalar alpha": (dict(alpha=torch.tensor(1.0)), ValueError, "alpha must be"),
    "center of the wrong size": (dict(center=torch.zeros(104)), ValueError, "center must be"),
    "center to broadcast": (dict(center=torch.zeros(3, 1, 1)), ValueError, "center must be"),
    "tau of the wrong K": (dict(tau=torch.zeros(4)), ValueError, "tau must be"),
    "tau with project": (dict(mode="project"), ValueError, "tau is only used"),
    "slope with clamp": (dict(slope=torch.zeros(3)), ValueError, "slope is only used"),
    "slope of the wrong K": (dict(mode="invert", slope=torch.zeros(2)), ValueError, "slope must be (K,)"),
    "integer slope": (dict(mode="invert", slope=torch.zeros(3, dtype=torch.int32)), TypeError, "slope must be"),
    "slope on another device": (dict(mode="invert", slope=torch.zeros(3, device="meta")), ValueError,
                                "slope is on meta"),
    "integer directions": (dict(directions=torch.ones(3, 105, dtype=torch.int64)), TypeError, "directions must be"),
    "directions on another device": (dict(directions=torch.randn(3, 105, device="meta")), ValueError,
                                     "directions is on meta"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named(case):
    change, exc, text = CASES[case]
    kw = {**_args(), **change}
    with pytest.raises(exc, match=re.escape(text)):
        _call(**kw)


@pytest.mark.parametrize("change", [
    dict(directions=torch.full((3, 105), float("nan"))), dict(alpha=torch.tensor([1.0, float("inf"), 1.0])),
    dict(center=torch.full((105,), float("nan"))), dict(tau=torch.tensor([0.0, float("nan"), 0.0])),
], ids=["NaN directions", "inf alpha", "NaN center", "NaN tau"])
def test_non_finite_parameters_give_the_ieee_answer_not_an_error(change):
    """The op reads no value on the host (no per-call sync, nothing cached): non-finite
    parameters reach the output as in the reference; their owners (RepairModule, Profile)
    refuse them where they are set (tests/repair/test_hardening_round1.py)."""
    kw = {**_args(), **change}
    out = _call(**kw)
    ref = fr.repair_reference(kw["x"], kw["directions"], kw["alpha"], kw["center"], kw["tau"], kw["mode"])[0]
    assert not torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_unknown_backend_variable(use_backend):
    use_backend("tpu")
    with pytest.raises(ValueError, match="FIRE_BACKEND"):
        _call(**_args())


def test_package_imports_without_extension():
    """With _C missing, import still works and the CPU op says how to build it."""
    code = (
        "import sys, warnings; sys.modules['fire_repair._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); import fire_repair\n"
        "assert any('could not be loaded' in str(m.message) for m in w)\n"
        "import torch\n"
        "try:\n"
        "    torch.ops.fire.repair(torch.ones(2, 3), torch.ones(1, 3), torch.ones(1), None, None, 'shift')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e), e; print('clear error')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "clear error" in res.stdout
