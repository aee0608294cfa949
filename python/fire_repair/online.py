"""Online repair: repair each batch of a stream and refine the directions as poisoned samples
arrive, so poisoned accuracy rises with the number seen.

Flags come from the caller (`step(x, poisoned=mask)`) or from the detector built on the fused
op's projection scores (a sample is flagged when its score exceeds `threshold`, in units of the
clean projection std). Flagged activations (captured before repair, in the same forward pass)
update the estimator's poisoned statistics; the repair buffers are then rewritten in place.
`Online` owns the model's repair modules while it runs (it attaches its own, replacing any
attached before); `close()` detaches them.
"""
from typing import Optional, Sequence, Union

import torch

from .attachment import attach, capture, detach, repair_modules
from .estimate import Estimator, poison_mask
from .profile import Profile


class Online:
    def __init__(self, estimator: Estimator, mode: str = "clamp",
                 alpha: Union[float, Sequence[float]] = 1.0, tau_quantile: float = 0.99,
                 threshold: Optional[float] = 3.0, min_poisoned: int = 1):
        """`estimator` holds what is known so far: at least clean statistics at its layers
        (and possibly some poisoned ones). `threshold`: detector cut-off in clean-std units
        (None: only caller flags update the directions)."""
        if mode == "invert":  # no pairs online, and the detector's picks are no draws of the triggered images
            raise ValueError("Online: mode 'invert' is not served online: its slope needs pairs, or flagged images "
                             "drawn like the clean ones (the online detector picks those that stand out); use "
                             "'gated' (invert without a slope)")
        self.model, self.estimator = estimator.model, estimator
        self.mode, self.alpha, self.tau_quantile = mode, alpha, tau_quantile
        self.threshold, self.min_poisoned = threshold, min_poisoned
        self.seen_poisoned = 0
        self.profile: Optional[Profile] = None
        self._refresh()

    def _ready(self) -> bool:
        return all(name in self.estimator.stats and self.estimator.stats[name].n_poison >= self.min_poisoned
                   and self.estimator.stats[name].n_clean > 0 for name in self.estimator.layers)

    def _refresh(self) -> None:
        if not self._ready():
            return
        profile = self.estimator.profile(mode=self.mode, alpha=self.alpha, tau_quantile=self.tau_quantile,
                                         source="unpaired", with_fingerprint=self.profile is None)
        modules = repair_modules(self.model)
        if self.profile is None or not modules:
            detach(self.model)
            attach(self.model, profile)
        else:
            for layer in profile.layers:
                modules[layer.name].load_layer(layer)
        self.profile = profile

    @torch.no_grad()
    def step(self, x: torch.Tensor, poisoned: Optional[torch.Tensor] = None):
        """Repairs x; returns (model output, flags used). Updates the directions afterwards."""
        modules = repair_modules(self.model)
        cap = None
        was_training = self.model.training
        self.model.eval()  # as Estimator and select do: never a training-mode pass (BatchNorm, dropout)
        try:
            if modules:
                with capture(self.model) as cap:
                    out = self.model(x)
            else:
                out = self.model(x)
        finally:
            self.model.train(was_training)
        flags = poisoned
        if flags is None and cap is not None and self.threshold is not None:
            flags = cap.score(self.estimator.layers[0]) > self.threshold
        if flags is not None:  # the estimator's rules: bools, numpy, sequences, 0/1 tensors
            flags = poison_mask(flags, x.shape[0])
            if flags is None:  # poisoned=False: nothing to learn from this batch
                flags = torch.zeros(x.shape[0], dtype=torch.bool)
        if flags is not None and flags.any():
            if cap is not None:  # activations captured before the repair, in the pass above
                for name, h in cap.inputs.items():
                    self.estimator.stats[name].add_poisoned(self.estimator.rows(h).cpu()[flags])
            else:
                self.estimator.observe(x[flags], poisoned=True)
            self.seen_poisoned += int(flags.sum())
            self._refresh()
        return out, flags

    def close(self) -> None:
        detach(self.model)
