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
          desc: str = "training"):
    """Adam with a cosine schedule and light augmentation (random 2-pixel shifts)."""
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
            loss = F.cross_entropy(model(xb), y[idx])
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
