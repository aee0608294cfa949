"""fire_repair: inference-time repair of backdoored networks (FIRE), on fused kernels.

Importing registers `torch.ops.fire.repair` and `torch.ops.fire.repair_with_scores`.

    est = fire_repair.Estimator(model, layers=["layer3"], k=1)
    est.observe(x_clean, poisoned=False); est.observe(x_poisoned, poisoned=True)
    profile = est.profile(mode="clamp", alpha=1.0)
    fire_repair.attach(model, profile)
"""
from . import _ext  # noqa: F401  (loads the extension, or warns how to build it)
from .attach import Capture, RepairModule, attach, capture, check_repairs, detach, repair_modules
from .detect import scores
from .estimate import Estimator
from .online import Online
from .ops import backend_for, repair, repair_with_scores
from .profile import LayerRepair, Profile, ProfileError, fingerprint
from .reference import MODES, repair_reference
from .select import Selection, select, select_unpaired

__version__ = "0.1.0"
__all__ = [
    "Capture", "Estimator", "LayerRepair", "MODES", "Online", "Profile", "ProfileError", "RepairModule", "Selection",
    "attach", "backend_for", "capture", "check_repairs", "detach", "fingerprint", "repair", "repair_modules",
    "repair_reference", "repair_with_scores", "scores", "select", "select_unpaired",
]
