"""Triton kernels of fire-kernels and their launchers.

Importable without Triton or a GPU: `HAVE_TRITON` says whether the kernels can run, and the
launchers raise a clear error when they cannot.
"""
from .blocks import MAX_K
from .modes import MODES, TAU_MODES, Mode
from .repair import CLAMP, GATED, HAVE_TRITON, INVERT, PROJECT, SHIFT, repair_rows

__all__ = ["HAVE_TRITON", "MAX_K", "MODES", "TAU_MODES", "Mode", "SHIFT", "PROJECT", "CLAMP", "GATED", "INVERT",
           "repair_rows"]
