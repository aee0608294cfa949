"""Seeded CPU-friendly training of (backdoored) models, with a safetensors cache."""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fire_repair.augment import random_shift


def train(model, x, y, epochs: int = 8, batch: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True,
          desc: str = "training", regularizer=None):
    """Adam with a cosine schedule and light augmentation (random 2-pixel shifts).

    `regularizer` (None: plain cross-entropy): a callable (model, xb, yb, idx) -> (logits, term)
    that runs the batch's forward pass itself (e.g. with hooks on the layers it reads) and adds
    `term` to the batch's cross-entropy; idx are the batch's rows of (x, y) (an attack looks up
    which are poisoned: attacks.training_regularizer). It draws nothing from the training's
    generator: the batches and shifts are those of the same training without it."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb = random_shift(x[idx], 2, gen)
            if regularizer is None:
                loss = F.cross_entropy(model(xb), y[idx])
            else:
                logits, term = regularizer(model, xb, y[idx], idx)
                loss = F.cross_entropy(logits, y[idx]) + term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


def cache_key(**spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_train(model, x, y, cache_dir, spec: dict, **train_kwargs):
    """Trains `model` on (x, y) unless a checkpoint for `spec` is cached (safetensors, no pickle)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{spec.get('attack', 'model')}-{cache_key(**spec)}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model.eval(), True
    train(model, x, y, **train_kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"spec": json.dumps(spec, sort_keys=True, default=str)})
    return model.eval(), False
