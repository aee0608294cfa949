"""The one backend decision of `torch.ops.fire.repair`: which kernel serves tensors on each device.

`decide` is the rule (FIRE_BACKEND=auto|triton|cuda|cpu, whether Triton is installed, whether
it runs interpreted). It runs when `fire_repair` is imported and on each `set_backend`, never
per call; the result is kept here for the Python body (`backend_for`) and told to the C++ op
(`fire_repair._ext.set_native_backends`), whose eager path only reads it: a call the C++ kernel
serves never enters Python and never reads the environment.
"""
import os

import torch

from fire_kernels import HAVE_TRITON

from .. import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu")
DEVICE_TYPES = ("cpu", "cuda")


def decide(setting: str, have_triton: bool, triton_interpret: bool) -> dict:
    """For each device type, 'native' (the C++ / CUDA C++ kernel), 'triton', or the error that a
    call on that device raises, as (exception type, message)."""
    if setting not in BACKENDS:
        error = (ValueError, f"FIRE_BACKEND must be one of {BACKENDS}, got {setting!r}")
        return dict.fromkeys(DEVICE_TYPES, error)
    if setting == "cuda":
        cuda = "native"
    elif have_triton:
        cuda = "triton"
    elif setting == "triton":
        cuda = (RuntimeError, "FIRE_BACKEND=triton but Triton is not installed")
    else:
        cuda = "native"
    cpu = "native"
    if setting == "triton":
        cpu = "triton" if have_triton and triton_interpret else (
            RuntimeError, "FIRE_BACKEND=triton on CPU tensors needs Triton and TRITON_INTERPRET=1")
    return {"cpu": cpu, "cuda": cuda}


_decision: dict = {}


def set_backend(name: str | None = None) -> str:
    """Chooses the backend of every later call of the ops: 'auto' (the default), 'triton',
    'cuda' or 'cpu' (docs/op.md#backends). It sets FIRE_BACKEND (so child processes inherit it);
    without a name, it applies FIRE_BACKEND as the environment holds it now (what importing
    fire_repair does). Returns the setting in force. An unknown name raises here; an unknown
    FIRE_BACKEND raises at each call of the ops, naming the variable."""
    global _decision
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"fire.repair: the backend (FIRE_BACKEND) must be one of {BACKENDS}, got {name!r}")
        os.environ["FIRE_BACKEND"] = name
    setting = os.environ.get("FIRE_BACKEND", "auto")
    _decision = decide(setting, HAVE_TRITON, os.environ.get("TRITON_INTERPRET") == "1")
    _ext.set_native_backends(_decision["cpu"] == "native", _decision["cuda"] == "native")
    return setting


def backend_for(device: torch.device) -> str:
    """'triton' or 'native' for tensors on `device`, as set (FIRE_BACKEND, `set_backend`); raises
    the error a call on that device would (an unknown setting, Triton missing, a device other
    than cpu and cuda). The C++ op consults the same decision."""
    choice = _decision.get(device.type)
    if choice is None:
        raise ValueError(f"fire.repair: x is on {device}; supported devices are cpu and cuda")
    if isinstance(choice, tuple):
        error, message = choice
        raise error(message)
    return choice
