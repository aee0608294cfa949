"""What a perfect repair at `block1` could reach on CIFAR-10's trigger token: the triggered
image's block1 tokens replaced by its twin's (every token, the trigger's own token, the class
token, or the tokens the trigger moved most), on the evaluation half. Labels are used: an upper bound
for FIRE, not a defense.

    OMP_NUM_THREADS=2 python experiments/cifar10-vit-trigger-token/oracle.py   # model cached
"""
import torch

from fire_eval import attacks, harness
from fire_eval import data as data_mod

cfg = harness.RunConfig(attack="token", model="vit", data="cifar10", data_path="/tmp/data", epochs=20, n_eval=2000,
                        n_clean_holdout=2000)
ds = data_mod.load("cifar10", "/tmp/data", seed=0, cache_dir=".fire-cache")
attack = attacks.build("token")
model, cached, _ = harness.backdoored_model(cfg, ds, attack, False)
assert cached, "train the model first (the README's command)"
perm = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(cfg.seed))
theirs = perm[len(perm) // 2:]
triggered, twins, labels = attacks.poisoned_test_set(ds.x_test[theirs], ds.y_test[theirs], attack)
triggered, twins, labels = triggered[:2000], twins[:2000], labels[:2000]  # the harness's evaluation images
# the trigger's token: the 4x4 cell that differs (token 0 is the class token)
cell = (triggered != twins).any(1).reshape(-1, 8, 4, 8, 4).any(4).any(2).flatten(1).float().argmax(1) + 1


@torch.no_grad()
def block1_of(x):
    out = {}
    h = model.block1.register_forward_hook(lambda m, a, o: out.__setitem__("o", o))
    try:
        model(x)
    finally:
        h.remove()
    return out["o"]


def swapping(replace, cells, twin_block1):
    """A forward hook on block1: its output taken from the twin at the tokens `replace` names."""
    def swap(m, a, o):
        mask = replace(cells, o - twin_block1)  # (n, T) tokens to take from the twin
        return torch.where(mask[..., None], twin_block1, o)
    return swap


@torch.no_grad()
def accuracy(replace=None):
    """Accuracy on the triggered images, block1's output replaced by the twin's at `replace`'s tokens."""
    correct = 0
    for i in range(0, len(labels), 250):
        sl = slice(i, i + 250)
        h = None if replace is None else model.block1.register_forward_hook(
            swapping(replace, cell[sl], block1_of(twins[sl])))
        try:
            correct += (model(triggered[sl]).argmax(1) == labels[sl]).sum().item()
        finally:
            if h is not None:
                h.remove()
    return 100 * correct / len(labels)


def tokens(which):
    def mask(c, shift):
        m = torch.zeros(shift.shape[:2], dtype=torch.bool)
        if "the most shifted (>= half the image's largest shift)" in which:
            norms = shift.norm(dim=2)
            m |= norms >= 0.5 * norms.amax(1, keepdim=True)
        if "trigger" in which:
            m[torch.arange(len(c)), c] = True
        if "class" in which:
            m[:, 0] = True
        if "all" in which:
            m[:] = True
        return m
    return mask


with torch.no_grad():
    twin_acc = 100 * (model(twins).argmax(1) == labels).float().mean().item()
print(f"CIFAR-10 ViT (20 epochs), trigger token, {len(labels)} evaluation images; accuracy %:")
print("| block1's tokens taken from the twin | PA % |")
print("|---|---:|")
print(f"| none (the undefended model) | {accuracy():.1f} |")
for which in (("trigger",), ("class",), ("trigger", "class"), ("the most shifted (>= half the image's largest shift)",),
              ("all",)):
    print(f"| {' and '.join(which)} | {accuracy(tokens(which)):.1f} |")
print(f"| (the twins themselves, no trigger) | {twin_acc:.1f} |")
