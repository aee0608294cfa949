"""Datasets as (x, y) tensors: x float (N, 3, 32, 32) in [0, 1], y int64.

- `digits`: scikit-learn's embedded 8x8 digits, upsampled to 32x32 and replicated to 3 channels
  (no network, no files);
- `cifar10`: a local copy in either official format (cifar-10-batches-bin, or the python
  batches, read with an unpickler that only admits numpy arrays);
- `gtsrb`: the official folder layout (Final_Training/Images/NNNNN/*.ppm with GT-NNNNN.csv, and
  Final_Test/Images with GT-final_test.csv), cropped to the ROI and resized to 32x32.
Nothing is ever downloaded: a missing path is an error that says what to put where.
"""
import csv
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def digits(seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset("digits", x[train].contiguous(), y[train], x[test].contiguous(), y[test], 10)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays; admit nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found: {what} (fire-repair never downloads data)")


def cifar10(root) -> Dataset:
    root = Path(root)
    binary = next((p for p in (root, root / "cifar-10-batches-bin") if (p / "data_batch_1.bin").exists()), None)
    python = next((p for p in (root, root / "cifar-10-batches-py") if (p / "data_batch_1").exists()), None)
    if binary is not None:
        def read(names):
            raw = np.concatenate([np.fromfile(binary / n, dtype=np.uint8).reshape(-1, 3073) for n in names])
            return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)
        train = read([f"data_batch_{i}.bin" for i in range(1, 6)])
        test = read(["test_batch.bin"])
    elif python is not None:
        def read(names):
            xs, ys = [], []
            for n in names:
                with open(python / n, "rb") as f:
                    d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], dtype=np.int64))
            return np.concatenate(xs), np.concatenate(ys)
        train = read([f"data_batch_{i}" for i in range(1, 6)])
        test = read(["test_batch"])
    else:
        raise _missing(root, "expected cifar-10-batches-bin/ or cifar-10-batches-py/ (data_batch_1..5, test_batch)")
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return Dataset("cifar10", to_x(train[0]), torch.from_numpy(train[1]), to_x(test[0]), torch.from_numpy(test[1]), 10)


def _read_ppm_roi(path: Path, row: dict) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        box = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        im = im.convert("RGB").crop(box).resize((32, 32), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def gtsrb(root, max_per_class: int = None) -> Dataset:
    root = Path(root)
    base = root / "GTSRB" if (root / "GTSRB").exists() else root
    train_dir = base / "Final_Training" / "Images"
    test_dir = base / "Final_Test" / "Images"
    if not train_dir.exists():
        raise _missing(train_dir, "expected the official GTSRB layout Final_Training/Images/00000/GT-00000.csv")
    xs, ys = [], []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        label = int(class_dir.name)
        with open(class_dir / f"GT-{class_dir.name}.csv") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        for row in rows[:max_per_class]:
            xs.append(_read_ppm_roi(class_dir / row["Filename"], row))
            ys.append(label)
    gt = next(iter(test_dir.glob("GT-final_test*.csv")), None) if test_dir.exists() else None
    if gt is None:
        gt = next(iter(base.glob("GT-final_test*.csv")), None)
    if gt is None:
        raise _missing(test_dir, "expected Final_Test/Images with GT-final_test.csv (the labelled test annotations)")
    tx, ty = [], []
    with open(gt) as f:
        for row in csv.DictReader(f, delimiter=";"):
            tx.append(_read_ppm_roi(test_dir / row["Filename"], row))
            ty.append(int(row["ClassId"]))
    to_x = lambda a: torch.from_numpy(np.stack(a).astype(np.float32) / 255.0)  # noqa: E731
    return Dataset("gtsrb", to_x(xs), torch.tensor(ys), to_x(tx), torch.tensor(ty), 43)


def load(name: str, path=None, seed: int = 0) -> Dataset:
    if name == "digits":
        return digits(seed)
    if path is None:
        raise ValueError(f"dataset {name!r} needs --data-path pointing at a local copy")
    if name == "cifar10":
        return cifar10(path)
    if name == "gtsrb":
        return gtsrb(path)
    raise ValueError(f"unknown dataset {name!r}; choose digits, cifar10 or gtsrb")
