"""The repair modes: one enum that the Python layer, the reference and the kernels share.

The C++ header `csrc/repair.h` declares the same values (`enum Mode`), and the Triton kernels
compare the constexpr MODE with these integers; tests/op/test_op_modes.py checks that all agree."""
from enum import IntEnum


class Mode(IntEnum):
    SHIFT = 0  # y = x - sum_k alpha_k b_k
    PROJECT = 1  # y = x - sum_k alpha_k c_k v_k
    CLAMP = 2  # y = x - sum_k alpha_k max(c_k - tau_k, 0) v_k
    GATED = 3  # y = x - sum_k alpha_k [c_k > tau_k] v_k: the shift, where the score flags a trigger
    # INVERT: gated, and the flagged row is also rescaled about the centre, undoing a trigger that
    # blends (x' - mu = (1 + g)(x - mu) + beta): t = x - sum_k w_k v_k with w_k = alpha_k [c_k > tau_k],
    # h = sum_k w_k g_k (g = slope), y = t + h / (1 + h) (mu - t), i.e. mu + (t - mu) / (1 + h)
    INVERT = 4

    @classmethod
    def parse(cls, name: str) -> "Mode":
        if not isinstance(name, str) or name.upper() not in cls.__members__ or name != name.lower():
            raise ValueError(f"mode must be one of {MODES}, got {name!r}")
        return cls[name.upper()]


MODES = tuple(m.name.lower() for m in Mode)  # ("shift", "project", "clamp", "gated", "invert")
TAU_MODES = ("clamp", "gated", "invert")  # the modes that compare scores with tau
SHIFT_MODES = ("shift", "gated", "invert")  # the modes whose rows are b_k = <beta, v_k> v_k (unnormalised)
SLOPE_MODES = ("invert",)  # the modes that take a slope (K,): without one, invert is gated
