"""Loads the compiled extension `fire_repair._C` (the C++ CPU kernel and the CUDA C++ fallback).

The package still imports without it; the native backends then raise `NativeUnavailable`
with the reason and the command that builds it.
"""
import warnings

import torch  # noqa: F401  (loads libc10 and friends, which _C links against)

BUILD_HINT = "build it with `pip install --no-build-isolation .` from the repository root (next to torch==2.13)"

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.fire._repair_native)

    AVAILABLE = True
    LOAD_ERROR = None
except ImportError as e:  # missing, or built against another torch
    AVAILABLE = False
    LOAD_ERROR = str(e)
    warnings.warn(f"fire_repair._C could not be loaded ({e}); CPU repair is unavailable: {BUILD_HINT}", stacklevel=2)


class NativeUnavailable(RuntimeError):
    pass


def set_native_backends(cpu: bool, cuda: bool) -> None:
    """Tells the C++ op which devices' eager calls the native kernels serve (the backend decision
    of fire_repair._op.backend); it takes those calls without entering Python and defers the
    others to the Python implementation (a no-op where the extension is not loaded)."""
    if AVAILABLE:
        _C.set_native_backends(bool(cpu), bool(cuda))


def require_native() -> None:
    if not AVAILABLE:
        raise NativeUnavailable(f"fire_repair._C is not loaded ({LOAD_ERROR}); {BUILD_HINT}")
