"""The repair profile: everything needed to repair one model, saved as safetensors.

The file holds only tensors and string metadata (never a pickle): a format tag and version,
the layer list (name, mode, K, feature shape), the model's fingerprint, free-form estimation
info, and a SHA-256 of the tensor bytes so that a tampered file is refused on load.
"""
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fire_kernels.modes import MODES

FORMAT = "fire-profile"
VERSION = "1"


class ProfileError(ValueError):
    """A profile file that is unreadable, tampered with, or does not fit the model."""


@dataclass
class LayerRepair:
    """The repair at one layer: the arguments of `torch.ops.fire.repair` plus what produced them."""

    name: str
    mode: str
    directions: torch.Tensor  # (K, *feature_shape): unit rows (project/clamp) or b_k (shift)
    alpha: torch.Tensor  # (K,)
    center: torch.Tensor  # feature_shape: the clean mean
    tau: Optional[torch.Tensor] = None  # (K,), clamp only
    score_scale: Optional[torch.Tensor] = None  # (K,): clean std of the projections
    beta: Optional[torch.Tensor] = None  # feature_shape: the raw trigger direction estimate

    def __post_init__(self):
        self.validate()

    @property
    def k(self) -> int:
        return self.directions.shape[0]

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.directions.shape[1:])

    def validate(self) -> None:
        where = f"layer {self.name!r}"
        if self.mode not in MODES:
            raise ProfileError(f"{where}: mode must be one of {MODES}, got {self.mode!r}")
        if self.directions.dim() < 2:
            raise ProfileError(f"{where}: directions must be (K, *feature_shape)")
        fs, k = self.feature_shape, self.k
        expect = {"alpha": (k,), "center": fs, "tau": (k,), "score_scale": (k,), "beta": fs}
        for attr, shape in expect.items():
            t = getattr(self, attr)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ProfileError(f"{where}: {attr} must have shape {shape}, got {tuple(t.shape)}")
        if self.mode == "clamp" and self.tau is None:
            raise ProfileError(f"{where}: mode 'clamp' needs tau")
        if self.mode != "clamp" and self.tau is not None:
            raise ProfileError(f"{where}: tau is only used by mode 'clamp'")
        for attr in ("directions", "alpha", "center", "score_scale", "beta"):
            t = getattr(self, attr)
            if t is not None and not torch.isfinite(t).all():
                raise ProfileError(f"{where}: {attr} has non-finite values")
        if self.tau is not None and torch.isnan(self.tau).any():
            raise ProfileError(f"{where}: tau has NaN")

    def tensors(self) -> dict:
        out = {"directions": self.directions, "alpha": self.alpha, "center": self.center}
        for attr in ("tau", "score_scale", "beta"):
            if getattr(self, attr) is not None:
                out[attr] = getattr(self, attr)
        return out


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes, values), attached repairs
    excluded: a profile is tied to the exact weights it was estimated on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("fire_repair.") or ".fire_repair." in name:
            continue
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Profile:
    layers: list  # of LayerRepair, in the order they are applied
    fingerprint: Optional[str] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ProfileError(f"a layer appears twice in the profile: {names}")
        if not names:
            raise ProfileError("a profile needs at least one layer")

    def layer(self, name: str) -> LayerRepair:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def layer_names(self) -> list:
        return [layer.name for layer in self.layers]

    def save(self, path) -> None:
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            for key, t in layer.tensors().items():
                tensors[f"{i}.{key}"] = t.detach().to("cpu", torch.float32).contiguous()
            layers.append({"name": layer.name, "mode": layer.mode, "k": layer.k,
                           "feature_shape": list(layer.feature_shape)})
        metadata = {
            "format": FORMAT, "version": VERSION, "layers": json.dumps(layers),
            "fingerprint": self.fingerprint or "", "info": json.dumps(self.info, default=str),
            "sha256": _digest(tensors),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, model: Optional[torch.nn.Module] = None, check_fingerprint: bool = True) -> "Profile":
        """Reads and checks a profile; with `model`, also checks that it belongs to that model."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ProfileError(f"{path} is not a readable profile (truncated or corrupted?): {e}") from e
        if meta.get("format") != FORMAT:
            raise ProfileError(f"{path} is not a fire profile (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ProfileError(f"{path} has profile version {meta.get('version')!r}; this library reads {VERSION!r}")
        if meta.get("sha256") != _digest(tensors):
            raise ProfileError(f"{path}: tensor contents do not match the recorded checksum (tampered or damaged)")
        try:
            specs = json.loads(meta["layers"])
            info = json.loads(meta.get("info", "{}"))
            layers = []
            for i, spec in enumerate(specs):
                t = {key.split(".", 1)[1]: v for key, v in tensors.items() if key.split(".", 1)[0] == str(i)}
                if tuple(t["directions"].shape) != (spec["k"], *spec["feature_shape"]):
                    raise ProfileError(f"layer {spec['name']!r}: directions do not match the recorded shape")
                layers.append(LayerRepair(name=spec["name"], mode=spec["mode"], **t))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path}: malformed profile metadata: {e!r}") from e
        profile = cls(layers=layers, fingerprint=meta.get("fingerprint") or None, info=info)
        if model is not None:
            profile.check(model, check_fingerprint=check_fingerprint)
        return profile

    def check(self, model: torch.nn.Module, check_fingerprint: bool = True) -> None:
        """Refuses a model that lacks a layer, or whose weights differ from the estimated ones."""
        names = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in names]
        if missing:
            raise ProfileError(f"the model has no layer(s) {missing}; it has e.g. {list(names)[1:8]}")
        if check_fingerprint and self.fingerprint and fingerprint(model) != self.fingerprint:
            raise ProfileError("the profile was estimated on a different model (weights fingerprint mismatch); "
                               "pass check_fingerprint=False to apply it anyway")


