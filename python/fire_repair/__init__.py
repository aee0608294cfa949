"""fire_repair: inference-time repair of backdoored networks (FIRE), on fused kernels.

Importing registers `torch.ops.fire.repair` and `torch.ops.fire.repair_with_scores`.
"""
from . import _ext
from .ops import backend_for, repair, repair_with_scores
from .reference import MODES, repair_reference

__version__ = "0.1.0"
__all__ = ["MODES", "backend_for", "repair", "repair_reference", "repair_with_scores"]
