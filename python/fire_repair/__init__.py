"""fire_repair: inference-time repair of backdoored networks (FIRE), on fused kernels.

Importing registers `torch.ops.fire.repair` and `torch.ops.fire.repair_with_scores`.

    est = fire_repair.Estimator(model, layers=["layer3"], k=1)
    est.observe(x_clean, poisoned=False); est.observe(x_poisoned, poisoned=True)
    profile = est.profile(mode="clamp", alpha=1.0)
    fire_repair.attach(model, profile)
"""
from fire_kernels.modes import MODES, TAU_MODES

from . import _ext  # noqa: F401  (loads the extension, or warns how to build it)
from .attachment import Capture, RepairModule, attach, attached, capture, check_repairs, detach, repair_modules
from .compile_cache import tag_compile_caches
from .deploy import export
from .detect import backdoor_scores
from .diagnose import trigger_spectrum
from .estimate import Estimator
from .inference import eval_mode, logits, predict
from .input_layer import WithInputLayer, with_input_layer
from .online import Online
from .ops import backend_for, repair, repair_with_scores
from .profile import LayerProfile, Profile, ProfileError, fingerprint
from .recipe import FORMS, Fit, FitConfig, candidate_layers, estimators, fit, matched_clean, positional_layers
from .reference import repair_reference
from .selection import Selection, choose, select, select_unpaired
from .smoothing import Smoothing

__version__ = "0.3.0"
tag_compile_caches()  # no compiled graph of another build of our ops is served from disk
__all__ = [
    "Capture", "Estimator", "FORMS", "Fit", "FitConfig", "LayerProfile", "MODES", "TAU_MODES", "Online", "Profile",
    "ProfileError", "RepairModule", "Selection", "Smoothing", "WithInputLayer",
    "attach", "attached", "backdoor_scores", "backend_for", "candidate_layers", "capture", "check_repairs", "choose",
    "detach", "estimators", "eval_mode", "export", "fingerprint", "fit", "logits", "matched_clean", "positional_layers",
    "predict", "repair", "repair_modules", "repair_reference", "repair_with_scores", "select",
    "select_unpaired", "trigger_spectrum", "with_input_layer",
]
# Words: the op's `scores` output and `Capture.projections` are the raw projections
# c = <v_k, x - center>; a "backdoor score" (`backdoor_scores`, `Capture.score`) is their
# per-sample maximum in units of the clean projections' std.
