"""The repair profile: everything needed to repair one model, saved as safetensors.

The file holds only tensors and string metadata (never a pickle): a format tag and version,
the layer list (name, mode, K, feature shape, form: flattened or per position with its channel
dim), the model's fingerprint, free-form estimation
info, and a SHA-256 over all of it (every metadata entry and every tensor's name, shape, dtype
and bytes), so that any edit that could change behaviour is refused on load.
"""
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fire_kernels import MAX_K
from fire_kernels.modes import MODES, SLOPE_MODES, TAU_MODES

from .smoothing import Smoothing

FORMAT = "fire-profile"
VERSION = "2"  # 2 records each layer's form (channel_dim); version 1 files (all flattened) still load
SMOOTHING_VERSION = "3"  # 3: a profile with smoothing (written only then, so older readers refuse it)
READABLE = ("1", "2", "3")


class ProfileError(ValueError):
    """A profile file that is unreadable, tampered with, or does not fit the model."""


def unusable_value(tensors: dict) -> Optional[str]:
    """The name of the first tensor the repair cannot use: NaN or inf anywhere (in float32, the
    arithmetic the kernels use), except `tau`, where inf is allowed (a direction that never
    clamps in) and only NaN is refused. (The finiteness rule of `check_values`.)"""
    for name, t in tensors.items():
        if t is None:
            continue
        t = t.detach().float()
        if bool(torch.isnan(t).any()) if name == "tau" else not bool(torch.isfinite(t).all()):
            return name
    return None


# How each owner words the finiteness rule (the rules themselves are shared: check_values).
PROFILE_WORDS = {"nonfinite": "has non-finite values (NaN or inf in float32)", "nan": "has NaN"}
MODULE_WORDS = {"nonfinite": "contains NaN or inf (in float32)", "nan": "contains NaN"}


def check_values(tensors: dict, mode: Optional[str], where: str, words: dict = PROFILE_WORDS) -> None:
    """The one set of value rules for a repair's tensors, applied wherever they are set or
    read back: `LayerProfile` (so `Profile.load`, re-hashed files included), `RepairModule`
    at construction, `load_layer`, `load_state_dict` (on the state as it will be after
    loading, whatever subset arrives) and `check()`, and `check_repairs(model)`. Checked in
    float32, the arithmetic the kernels use (a value finite in float64 can overflow there):
    - every tensor finite; `tau` may be +-inf but not NaN, and not -inf in clamp (where
      alpha * (c - tau) is inf for every row);
    - `score_scale` > 0 (it divides the backdoor score: 0 or a negative scale turns the
      detector upside down);
    - alpha_k * max|v_k| finite in float32 (the shift a flagged row receives);
    - invert: alpha * slope finite in float32, and 1 + sum_k alpha_k slope_k above 0.05 for every
      set of flags (`check_slope`).
    Raises ProfileError (a ValueError) naming `where` and the tensor."""
    bad = unusable_value(tensors)
    if bad is not None:
        raise ProfileError(f"{where}: {bad} {words['nan' if bad == 'tau' else 'nonfinite']}")
    tau = tensors.get("tau")
    if tau is not None and mode == "clamp" and bool((tau.float() == float("-inf")).any()):
        raise ProfileError(f"{where}: tau is -inf, which clamp cannot use (alpha * (c - tau) is inf for every row)")
    scale = tensors.get("score_scale")
    if scale is not None and not bool((scale.float() > 0).all()):
        raise ProfileError(f"{where}: score_scale must be > 0 (it divides the backdoor score), got "
                           f"{scale.float().tolist()}")
    alpha, directions = tensors.get("alpha"), tensors.get("directions")
    if alpha is not None and directions is not None and alpha.dim() == 1 and directions.dim() >= 1 \
            and directions.shape[0] == alpha.shape[0] and directions.numel():
        reach = alpha.float().abs() * directions.detach().float().reshape(alpha.shape[0], -1).abs().amax(1)
        if not bool(torch.isfinite(reach).all()):
            raise ProfileError(f"{where}: alpha * directions overflows float32 (the kernels compute in float32)")
    slope = tensors.get("slope")
    if slope is not None and alpha is not None and slope.shape == alpha.shape:
        check_slope(alpha, slope, where)


def check_slope(alpha: torch.Tensor, slope: torch.Tensor, where: str) -> None:
    """Invert divides a flagged row's distance to the centre by 1 + sum_k alpha_k slope_k over
    the flagged directions: refused unless that stays above 0.05 for every set of flags (a
    blend of strength a has slope -a: alpha 1 undoes it up to a = 0.95), and unless every
    product and both extreme sums are finite in float32, the kernels' arithmetic."""
    prod = alpha.detach().float() * slope.detach().float()
    if not bool(torch.isfinite(prod).all()) or not bool(torch.isfinite(prod.clamp_min(0).sum()).all()) or \
            not bool(torch.isfinite(prod.clamp_max(0).sum()).all()):
        raise ProfileError(f"{where}: alpha * slope overflows float32 (the kernels compute in float32)")
    worst = min(1 + float((alpha.double() * slope.double()).clamp_max(0).sum()), 1 + float(prod.clamp_max(0).sum()))
    if not worst > 0.05:
        raise ProfileError(f"{where}: 1 + sum of the negative alpha * slope is {worst:.3g}; invert needs it above "
                           "0.05 (it divides by it)")


@dataclass
class LayerProfile:
    """The repair at one layer: the arguments of `torch.ops.fire.repair` plus what produced them.

    Flattened (channel_dim None): a direction spans the layer's whole output, feature_shape is
    that output's shape without the batch. Per position (channel_dim the channel dim of the
    output, 1 for NCHW maps, -1 for (N, T, C) tokens): directions are (K, C), applied at every
    position, and feature_shape is (C,)."""

    name: str
    mode: str
    directions: torch.Tensor  # (K, *feature_shape): unit rows (project/clamp) or b_k (shift/gated/invert)
    alpha: torch.Tensor  # (K,)
    center: torch.Tensor  # feature_shape: the clean mean
    tau: Optional[torch.Tensor] = None  # (K,), clamp, gated and invert only
    score_scale: Optional[torch.Tensor] = None  # (K,): clean std of the projections
    beta: Optional[torch.Tensor] = None  # feature_shape: the raw trigger direction estimate
    channel_dim: Optional[int] = None  # None: flattened; an int: per position
    slope: Optional[torch.Tensor] = None  # (K,), invert only: the trigger's scaling of x - center

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
        if self.channel_dim is not None:
            if isinstance(self.channel_dim, bool) or not isinstance(self.channel_dim, int) or self.channel_dim == 0:
                raise ProfileError(f"{where}: channel_dim must be None or a non-zero int, got {self.channel_dim!r}")
            if self.directions.dim() != 2:
                raise ProfileError(f"{where}: per-position directions must be (K, C)")
        fs, k = self.feature_shape, self.k
        expect = {"alpha": (k,), "center": fs, "tau": (k,), "score_scale": (k,), "beta": fs, "slope": (k,)}
        for attr, shape in expect.items():
            t = getattr(self, attr)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ProfileError(f"{where}: {attr} must have shape {shape}, got {tuple(t.shape)}")
        if self.mode in TAU_MODES and self.tau is None:
            raise ProfileError(f"{where}: mode {self.mode!r} needs tau")
        if self.mode not in TAU_MODES and self.tau is not None:
            raise ProfileError(f"{where}: tau is only used by the modes {TAU_MODES}")
        if self.mode in SLOPE_MODES and self.slope is None:
            raise ProfileError(f"{where}: mode {self.mode!r} needs slope")
        if self.mode not in SLOPE_MODES and self.slope is not None:
            raise ProfileError(f"{where}: slope is only used by the modes {SLOPE_MODES}")
        check_values({attr: getattr(self, attr) for attr in
                      ("directions", "alpha", "center", "score_scale", "beta", "tau", "slope")}, self.mode, where)

    @property
    def form(self) -> str:
        return "flattened" if self.channel_dim is None else "per_position"

    def tensors(self) -> dict:
        out = {"directions": self.directions, "alpha": self.alpha, "center": self.center}
        for attr in ("tau", "score_scale", "beta", "slope"):
            if getattr(self, attr) is not None:
                out[attr] = getattr(self, attr)
        return out


def _sha256(tensors, metadata: Optional[dict] = None) -> str:
    """SHA-256 of (name, tensor) pairs (name, shape, dtype, bytes) and of string metadata: the
    one hashing helper of the model fingerprint and the profile digest."""
    h = hashlib.sha256()
    for key in sorted(metadata or {}):
        h.update(f"meta|{len(key)}|{key}|{len(metadata[key])}|{metadata[key]}|".encode())
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"tensor|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes, values), attached repairs
    excluded: a profile is tied to the exact weights it was estimated on."""
    return _sha256((name, t) for name, t in model.state_dict().items()
                   if not (name.startswith("fire_repair.") or ".fire_repair." in name))


def _digest(tensors: dict, metadata: dict) -> str:
    """Everything that changes behaviour: every metadata entry but the digest itself, and
    every tensor."""
    return _sha256(((k, tensors[k]) for k in sorted(tensors)), {k: v for k, v in metadata.items() if k != "sha256"})


def _check_regular_file(path) -> None:
    """A FIFO or device would block or stream forever: only regular files are read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ProfileError(f"{path} cannot be read: {e}") from e
    if not stat.S_ISREG(mode):
        raise ProfileError(f"{path} is not a regular file; a profile is read only from a regular file")


@dataclass
class Profile:
    layers: list  # of LayerProfile, in the order they are applied
    fingerprint: Optional[str] = None
    info: dict = field(default_factory=dict)
    # blur the input where the scores at one per-position layer flag a trigger (fire_repair.smoothing)
    smoothing: Optional[Smoothing] = None

    def __post_init__(self):
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ProfileError(f"a layer appears twice in the profile: {names}")
        if not names:
            raise ProfileError("a profile needs at least one layer")
        self.check_smoothing()

    def check_smoothing(self) -> None:
        """Refuses a smoothing that this profile cannot apply (run on construction, save and
        attach, since the field can be set afterwards)."""
        names = self.layer_names
        if self.smoothing is not None:
            if not isinstance(self.smoothing, Smoothing):
                raise ProfileError(f"smoothing must be a fire_repair.Smoothing, got {type(self.smoothing).__name__}")
            if self.smoothing.layer not in names:
                raise ProfileError(f"smoothing reads the scores at {self.smoothing.layer!r}, which is not a layer of "
                                   f"the profile ({names})")
            if self.layer(self.smoothing.layer).channel_dim != 1:
                raise ProfileError(f"smoothing needs a per-position layer of images (channel_dim 1); "
                                   f"{self.smoothing.layer!r} is not one")

    def layer(self, name: str) -> LayerProfile:
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
                           "feature_shape": list(layer.feature_shape), "channel_dim": layer.channel_dim})
        metadata = {
            "format": FORMAT, "version": VERSION, "layers": json.dumps(layers),
            "fingerprint": self.fingerprint or "", "info": json.dumps(self.info, default=str),
        }
        self.check_smoothing()
        if self.smoothing is not None:  # only then: a profile without it saves as before
            metadata["smoothing"] = json.dumps(self.smoothing.to_dict())
            metadata["version"] = SMOOTHING_VERSION  # an older library refuses it instead of serving it unsmoothed
        metadata["sha256"] = _digest(tensors, metadata)
        save_file(tensors, os.fsdecode(os.fspath(path)), metadata=metadata)

    @classmethod
    def load(cls, path, model: Optional[torch.nn.Module] = None, check_fingerprint: bool = True,
             allow_other_model: bool = False) -> "Profile":
        """Reads and checks a profile; with `model`, also checks that it belongs to that model.
        A file without a model fingerprint is refused unless `allow_other_model=True` says that
        the caller accepts a profile that is not tied to particular weights."""
        path = os.fsdecode(os.fspath(path))  # str, bytes or os.PathLike
        _check_regular_file(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001  (any parse failure of a crafted file is a ProfileError)
            raise ProfileError(f"{path} is not a readable profile (truncated or corrupted?): {e}") from e
        if meta.get("format") != FORMAT:
            raise ProfileError(f"{path} is not a fire profile (format {meta.get('format')!r})")
        if meta.get("version") not in READABLE:
            raise ProfileError(f"{path} has profile version {meta.get('version')!r}; this library reads {READABLE}")
        if meta.get("sha256") != _digest(tensors, meta):
            raise ProfileError(f"{path}: contents do not match the recorded checksum (tampered or damaged)")
        try:
            layers, info = _parse(meta, tensors)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001  (RecursionError, IndexError, ... from crafted metadata)
            raise ProfileError(f"{path}: malformed profile metadata: {e!r}") from None
        fp = meta.get("fingerprint") or None
        if fp is None and not allow_other_model:
            raise ProfileError(f"{path} has no model fingerprint, so nothing ties it to a model; pass "
                               "allow_other_model=True to load it anyway")
        try:
            smoothing = Smoothing.from_dict(json.loads(meta["smoothing"])) if "smoothing" in meta else None
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise ProfileError(f"{path}: malformed smoothing: {e}") from None
        profile = cls(layers=layers, fingerprint=fp, info=info, smoothing=smoothing)
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




def _parse(meta: dict, tensors: dict):
    """(layers, info) from checked metadata; every field's type, every tensor's dtype and
    shape, and K are validated here, so that a file loads exactly as saved or not at all."""
    specs = json.loads(meta["layers"])
    info = json.loads(meta.get("info", "{}"))
    if not isinstance(info, dict):
        raise ProfileError("info must be a JSON object")
    if not isinstance(specs, list) or not specs:
        raise ProfileError("layers must be a non-empty JSON list")
    fields = {"name": str, "mode": str, "k": int, "feature_shape": list}
    if meta["version"] != "1":
        fields["channel_dim"] = (int, type(None))
    layers, used = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) != set(fields) or \
                any(not isinstance(spec[f], t) or isinstance(spec[f], bool) for f, t in fields.items()):
            raise ProfileError(f"layer {i}: expected {{{', '.join(fields)}}} of types "
                               f"{[getattr(t, '__name__', str(t)) for t in fields.values()]}")
        if not 1 <= spec["k"] <= MAX_K:
            raise ProfileError(f"layer {spec['name']!r}: k must be between 1 and {MAX_K}, got {spec['k']}")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in spec["feature_shape"]):
            raise ProfileError(f"layer {spec['name']!r}: feature_shape must be positive integers")
        t = {}
        for key in ("directions", "alpha", "center", "tau", "score_scale", "beta", "slope"):
            name = f"{i}.{key}"
            if name in tensors:
                if tensors[name].dtype != torch.float32:
                    raise ProfileError(f"layer {spec['name']!r}: {key} must be float32, got {tensors[name].dtype}")
                t[key] = tensors[name]
                used.add(name)
        for key in ("directions", "alpha", "center"):
            if key not in t:
                raise ProfileError(f"layer {spec['name']!r}: the file lacks {key}")
        if tuple(t["directions"].shape) != (spec["k"], *spec["feature_shape"]):
            raise ProfileError(f"layer {spec['name']!r}: directions do not match the recorded shape")
        layers.append(LayerProfile(name=spec["name"], mode=spec["mode"], channel_dim=spec.get("channel_dim"), **t))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ProfileError(f"tensors {extra} belong to no layer")
    return layers, info


