"""Triton kernels of fire-kernels and their launchers.

Importable without Triton or a GPU: `HAVE_TRITON` says whether the kernels can run, and the
launchers raise a clear error when they cannot.
"""
from .blocks import MAX_K
from .repair import HAVE_TRITON, SHIFT, PROJECT, CLAMP, repair_rows

__all__ = ["HAVE_TRITON", "MAX_K", "SHIFT", "PROJECT", "CLAMP", "repair_rows"]
