"""Streaming, mergeable estimation of backdoor directions at named layers: `Estimator`.

It hooks the named layers, feeds their outputs to running statistics (`stats`), merges,
reduces (`distributed`) and checkpoints them, and packs their calibrated repairs (`calibrate`,
from the directions of `directions`) into a `Profile`.
"""
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from fire_kernels import MAX_K
from fire_kernels.modes import MODES

from ._op.validate import channel_dim_of
from .attachment import RepairWrapper
from .calibrate import calibrate
from .directions import PAIRED_BETAS, choose_source
from .distributed import all_reduce_stats
from .inference import eval_mode
from .outputs import hidden_state
from .profile import Profile, _sha256, fingerprint
from .stats import LayerStats, PositionStats, check_state, stats_from_state_dict

CHECKSUM = "sha256"  # per layer in Estimator.state_dict: SHA-256 of the layer's other entries, as 32 uint8


def _state_digest(state: dict) -> torch.Tensor:
    """SHA-256 of a layer's checkpointed statistics (names, shapes, dtypes, bytes), as 32 uint8."""
    return torch.tensor(list(bytes.fromhex(_sha256((k, state[k]) for k in sorted(state)))), dtype=torch.uint8)


def _check_k(k: int, sketch_rows: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    if sketch_rows < k:
        raise ValueError(f"sketch_rows ({sketch_rows}) must be at least k ({k})")


def poison_mask(poisoned, n: int) -> Optional[torch.Tensor]:
    """None for a whole clean batch, or an (n,) bool tensor (True everywhere for poisoned=True)."""
    if isinstance(poisoned, (bool, np.bool_)):
        return torch.ones(n, dtype=torch.bool) if poisoned else None
    if isinstance(poisoned, torch.Tensor):
        mask = poisoned.detach().cpu()
    else:
        try:
            mask = torch.as_tensor(np.asarray(poisoned))
        except (TypeError, ValueError) as e:
            raise TypeError(f"poisoned must be a bool or a per-sample mask, got {type(poisoned).__name__}") from e
    if mask.dtype != torch.bool and mask.numel() == 0:  # [] (numpy makes it float64) for an empty batch
        mask = mask.to(torch.bool)
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"poisoned mask must hold booleans (or 0/1), got dtype {mask.dtype}")
        mask = mask.to(torch.bool)
    if tuple(mask.shape) != (n,):
        raise ValueError(f"poisoned mask must be ({n},), one flag per sample, got {tuple(mask.shape)}")
    return mask


class Estimator:
    """Collects activations at named layers through forward hooks and estimates directions.

    >>> est = Estimator(model, layers=["layer3"], k=1)
    >>> est.observe(x_clean, poisoned=False); est.observe(x_poisoned, poisoned=True)
    >>> profile = est.profile(mode="clamp", alpha=1.0)

    `per_position=True` estimates (K, C) directions over the channels at `channel_dim` (1 for
    NCHW maps, -1 for (N, T, C) tokens), applied at every position: for triggers that move, and
    for transformers. `touched` is the share of a pair's largest per-position difference that
    marks a position as touched by the trigger (see PositionStats); `reservoir` then counts
    positions, not samples (default 16 x 512).

    `paired_beta` is how paired observations give beta: "mean" (the mean difference, the
    paper's rule) or "control_variate" (corrected for the pairs' own sample of images; exact
    for blending triggers, see `directions.control_variate_beta`).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str], k: int = 1,
                 augment: Optional[Callable] = None, n_augment: int = 1, sketch_rows: int = 32,
                 reservoir: Optional[int] = None, seed: int = 0, per_position: bool = False,
                 channel_dim: int = 1, touched: float = 0.5, paired_beta: str = "mean"):
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("name at least one layer")
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"the model has no layer(s) {missing}; it has e.g. {list(modules)[1:10]}")
        _check_k(k, sketch_rows)
        if n_augment < 1:
            raise ValueError(f"n_augment must be >= 1, got {n_augment}")
        if per_position and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim == 0):
            raise ValueError(f"channel_dim must be a non-zero int (the batch dim 0 is not a channel dim), "
                             f"got {channel_dim!r}")
        if not 0.0 < touched <= 1.0:
            raise ValueError(f"touched must be in (0, 1], got {touched}")
        if paired_beta not in PAIRED_BETAS:
            raise ValueError(f"paired_beta must be one of {PAIRED_BETAS}, got {paired_beta!r}")
        self.paired_beta = paired_beta
        self.model, self.layers, self.k = model, list(layers), k
        self.augment, self.n_augment = augment, n_augment
        self.per_position, self.channel_dim, self.touched = bool(per_position), channel_dim, touched
        if reservoir is None:
            reservoir = 512 * (16 if per_position else 1)
        self.sketch_rows, self.reservoir, self.seed = sketch_rows, reservoir, seed
        self.stats: dict = {}
        # a layer already repaired (attach) is hooked inside its wrapper: its own output, before the repair
        self._modules = {name: modules[name].layer if isinstance(modules[name], RepairWrapper)
                         else modules[name] for name in self.layers}

    # -- activations
    @property
    def form(self) -> str:
        return "per_position" if self.per_position else "flattened"

    def _new_stats(self, h: torch.Tensor) -> Union[LayerStats, PositionStats]:
        if self.per_position:
            return PositionStats(h.shape[-1], self.sketch_rows, self.reservoir, self.seed, self.touched)
        return LayerStats(h.shape[1:], self.sketch_rows, self.reservoir, self.seed)

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """A layer output as this estimator's rows: (N, D) fp32 flattened, or (N, P, C) fp32
        per position (the channel dim moved last, every other feature dim a position)."""
        if not self.per_position:
            return h.detach().reshape(h.shape[0], -1).float()
        hm = h.detach().movedim(channel_dim_of(h, self.channel_dim), -1)  # the op's own check of channel_dim
        return hm.reshape(h.shape[0], -1, hm.shape[-1]).float()

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> dict:
        """The outputs of the named layers for x as rows (see `rows`), in eval mode."""
        captured = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(
                 name, hidden_state(out, name)))
                 for name, m in self._modules.items()]
        try:
            with eval_mode(self.model):
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for name in self.layers:
            if name not in captured:
                raise RuntimeError(f"layer {name!r} did not run in the forward pass")
            h = self.rows(captured[name])
            if name not in self.stats:
                self.stats[name] = self._new_stats(h if self.per_position else captured[name])
            # per position, only the channels must agree: positions may differ between batches
            shape = (h.shape[-1],) if self.per_position else tuple(captured[name].shape[1:])
            if shape != self.stats[name].feature_shape:
                what = "channels" if self.per_position else "shape"
                raise ValueError(f"layer {name!r} produced {what} {shape}, earlier {self.stats[name].feature_shape}")
            out[name] = h
        return out

    def _views(self, x):
        """x itself, or its augmented copies (the unpaired estimate averages over augmentations)."""
        if self.augment is None:
            return [x]
        views = [self.augment(x) for _ in range(self.n_augment)]
        for v in views:
            if not isinstance(v, torch.Tensor) or v.shape[:1] != x.shape[:1]:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"augment must return one augmented sample per input, a tensor of batch size "
                                 f"{x.shape[0]}; it returned {got}")
        return views

    # -- observation
    def observe(self, x: torch.Tensor, poisoned) -> None:
        """Unpaired: a batch of clean (poisoned=False) or poisoned (True) inputs, or a per-sample
        mask of which rows are poisoned (a bool tensor, numpy array or sequence, or 0/1 values).
        An empty batch is a no-op; non-finite activations are refused with nothing recorded."""
        mask = poison_mask(poisoned, x.shape[0])
        if x.shape[0] == 0:
            return
        views = [self._finite(self.activations(view)) for view in self._views(x)]  # all checked first
        for acts in views:
            for name, h in acts.items():
                h = h.cpu()
                if mask is None or not bool(mask.all()):
                    self.stats[name].add_clean(h if mask is None else h[~mask])
                if mask is not None and bool(mask.any()):
                    self.stats[name].add_poisoned(h[mask])

    def observe_pairs(self, x_clean: torch.Tensor, x_poisoned: torch.Tensor) -> None:
        """Paired: row i of x_poisoned is row i of x_clean with the trigger (empty: a no-op)."""
        if x_clean.shape != x_poisoned.shape:
            raise ValueError(f"pairs must have equal shapes, got {tuple(x_clean.shape)} and {tuple(x_poisoned.shape)}")
        if x_clean.shape[0] == 0:
            return
        hc, hp = self._finite(self.activations(x_clean)), self._finite(self.activations(x_poisoned))
        for name in self.layers:
            self.stats[name].add_pairs(hc[name], hp[name])

    @staticmethod
    def _finite(acts: dict) -> dict:
        for name, h in acts.items():
            bad = ~torch.isfinite(h.reshape(h.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten()[:5].tolist()
                raise ValueError(f"non-finite activations at layer {name!r} (rows {rows}); nothing was recorded")
        return acts

    def observe_loader(self, batches: Iterable, poisoned=None, paired: bool = False, progress: bool = True,
                       desc: str = "estimating") -> None:
        """Feeds an iterable of batches: x, (x, poisoned_mask) or, with paired=True, (x_clean, x_poisoned)."""
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            if paired:
                self.observe_pairs(*batch[:2])
            elif poisoned is None:
                self.observe(batch[0], poisoned=batch[1])
            else:
                self.observe(batch[0] if isinstance(batch, (tuple, list)) else batch, poisoned=poisoned)

    # -- merging (several processes or shards)
    def merge(self, other: "Estimator") -> "Estimator":
        """Adds other's statistics to this one's (copied: later updates of either stay apart).
        Refused, with nothing changed, unless other observed the same model (same weights), in
        the same form, at layers this estimator watches."""
        unknown = sorted(set(other.stats) - set(self.layers))
        if unknown:
            raise ValueError(f"cannot merge statistics of layer(s) {unknown}: this estimator does not watch them "
                             f"({self.layers})")
        if other.per_position != self.per_position:
            raise ValueError(f"cannot merge {other.form} statistics into a {self.form} estimator")
        if other.model is not self.model and fingerprint(other.model) != fingerprint(self.model):
            raise ValueError("cannot merge an estimator of another model (the weights' fingerprints differ)")
        for name, stats in other.stats.items():
            if name not in self.stats:
                self.stats[name] = stats.copy()
            else:
                self.stats[name].merge(stats)
        return self

    def state_dict(self) -> dict:
        """{"<layer>/<statistic>": tensor}: a checkpoint of everything observed (save it with
        safetensors; load_state_dict restores it into an estimator on the same model)."""
        out = {}
        for layer, st in self.stats.items():
            state = st.state_dict()
            state[CHECKSUM] = _state_digest(state)
            out.update({f"{layer}/{k}": v for k, v in state.items()})
        return out

    def load_state_dict(self, state: dict, allow_unverified: bool = False) -> "Estimator":
        """Restores a checkpoint of `state_dict`. Refused with an error naming the layer and the
        statistic, and nothing changed, unless every entry is a tensor of a watched layer, the
        checksum of each layer's statistics matches, and they are consistent and of this
        estimator's form (flattened or per position). A checkpoint without checksums (an earlier
        release's) is refused unless `allow_unverified=True`: then only the consistency checks
        stand between an edited statistic and the directions."""
        per_layer: dict = {}
        for key, value in state.items():
            if not isinstance(key, str) or "/" not in key:
                raise ValueError(f"checkpoint key {key!r} is not '<layer>/<statistic>'")
            layer, _, name = key.rpartition("/")
            if layer not in self.layers:
                raise ValueError(f"state for layer {layer!r}, which this estimator does not watch ({self.layers})")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint entry {key!r} must be a tensor, got {type(value).__name__}")
            per_layer.setdefault(layer, {})[name] = value
        stats = {}
        for layer, st in per_layer.items():
            try:
                recorded = st.pop(CHECKSUM, None)  # absent from an earlier release's checkpoints
                check_state(st)  # keys and kinds first: a missing entry is named, not a checksum mismatch
                if recorded is None and not allow_unverified:
                    raise ValueError(f"no '{CHECKSUM}' entry: the checkpoint carries no checksum (an earlier "
                                     "release's?); pass allow_unverified=True to load it anyway")
                if recorded is not None and (recorded.dtype != torch.uint8 or recorded.shape != (32,)
                                             or not torch.equal(recorded, _state_digest(st))):
                    raise ValueError("contents do not match the recorded checksum (tampered or damaged)")
                stats[layer] = stats_from_state_dict(st)
            except (ValueError, TypeError) as e:
                raise type(e)(f"checkpoint of layer {layer!r}: {e}") from None
            if isinstance(stats[layer], PositionStats) != self.per_position:
                held = "flattened" if self.per_position else "per-position"
                raise ValueError(f"checkpoint of layer {layer!r}: {held} statistics, but this estimator is {self.form}")
        self.stats = stats
        return self

    def clone(self) -> "Estimator":
        """An estimator on the same model and settings with a copy of these statistics (what
        selection extends with the pairs of each fold)."""
        out = Estimator(self.model, self.layers, self.k, self.augment, self.n_augment, self.sketch_rows,
                        self.reservoir, self.seed, self.per_position, self.channel_dim, self.touched,
                        self.paired_beta)
        return out.merge(self)

    def all_reduce(self, group=None) -> "Estimator":
        """Merges the estimators of all ranks of a torch.distributed group, in rank order, so every
        rank ends with the same statistics (tensor collectives only, nothing is pickled)."""
        self.stats = all_reduce_stats(self.stats, self.layers, group)
        return self

    # -- the profile
    def profile(self, mode: str = "clamp", alpha: Union[float, Sequence[float]] = 1.0, tau_quantile: float = 0.99,
                source: str = "auto", k: Optional[int] = None, layers: Optional[Sequence[str]] = None,
                with_fingerprint: bool = True) -> Profile:
        """Calibrates centre (clean mean), tau (the `tau_quantile` of the clean projections),
        score scale (their std) and packs a Profile for the named layers (default: all).
        `with_fingerprint=False` skips hashing the model's weights (for profiles rebuilt many
        times on a model known to be unchanged: online refreshes, selection candidates)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= tau_quantile <= 1.0:
            raise ValueError(f"tau_quantile must be in [0, 1], got {tau_quantile}")
        k = self.k if k is None else k
        _check_k(k, self.sketch_rows)
        a = torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if a.numel() == 1:
            a = a.expand(k).clone()
        if a.shape != (k,):
            raise ValueError(f"alpha must be a float or {k} values, got {a.numel()}")
        out, info = [], {"k": k, "tau_quantile": tau_quantile, "layers": {}}
        for name in layers or self.layers:
            if name not in self.stats:
                raise ValueError(f"nothing was observed at layer {name!r}")
            st = self.stats[name]
            src = choose_source(st, source)
            layer = calibrate(st, name, mode, a, k, src, tau_quantile,
                              channel_dim=self.channel_dim if self.per_position else None,
                              paired_beta=self.paired_beta)
            out.append(layer)
            # per position, the counts are of rows (positions), not of samples
            info["layers"][name] = {"source": src, "form": self.form, "n_clean": st.n_clean,
                                    "n_poisoned": st.n_poison, "n_pairs": st.n_pairs,
                                    "beta_norm": float(layer.beta.norm())}
            if src == "paired":
                info["layers"][name]["paired_beta"] = self.paired_beta
        return Profile(layers=out, fingerprint=fingerprint(self.model) if with_fingerprint else None, info=info)

