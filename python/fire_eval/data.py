"""Datasets as (x, y) tensors: x float (N, 3, 32, 32) in [0, 1], y int64.

- `digits`: scikit-learn's embedded 8x8 digits, upsampled to 32x32 and replicated to 3 channels
  (no network, no files);
- `cifar10`: a local copy in either official format (cifar-10-batches-bin, or the python
  batches, read with an unpickler that only admits numpy arrays), or as image folders
  (train/<class>/*.jpg, test/<class>/*.jpg);
- `folder`: any data set as image folders, classes from the sub-folder names (sorted);
- `gtsrb`: the official folder layout (Final_Training/Images/NNNNN/*.ppm with GT-NNNNN.csv, and
  Final_Test/Images with the labelled GT-final_test.csv, wherever that separate archive put
  it), cropped to the ROI (scaled to the stored image size) and resized to 32x32.
Nothing is ever downloaded: a missing path is an error that says what to put where.
"""
import csv
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    classes: Optional[list] = None  # class names, where the data names them


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


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp"}


def _folder_split(split_dir: Path, classes=None):
    """(files, labels, classes) of one split: one sub-folder per class."""
    if not split_dir.is_dir():
        raise _missing(split_dir, "expected one sub-folder of images per class")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"{split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    if classes is not None and found != classes:
        raise ValueError(f"{split_dir} has classes {found}, but the training split has {classes}")
    files, labels = [], []
    for label, name in enumerate(found):
        images = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{split_dir / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += images
        labels += [label] * len(images)
    return files, labels, found


def _read_images(files, size: int = 32) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except OSError as e:
            raise ValueError(f"{path} is not a readable image: {e}") from None
    return out


def _cached_images(files, cache_dir, size: int = 32) -> np.ndarray:
    """Decoded images, cached as uint8 safetensors keyed by the files' paths, sizes and times
    (decoding 60,000 JPEGs takes about half a minute on 2 cores)."""
    if cache_dir is None:
        return _read_images(files, size)
    from safetensors.numpy import load_file, save_file

    h = hashlib.sha256(str(size).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    path = Path(cache_dir) / f"images-{h.hexdigest()[:20]}.safetensors"
    if path.is_file():
        return load_file(str(path))["x"]
    x = _read_images(files, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x}, str(path))
    return x


def image_folder(root, name: str = "folder", cache_dir=None) -> Dataset:
    """root/train/<class>/* and root/test/<class>/*, any common image format, resized to 32x32
    where stored at another size; labels are the sorted class-folder names' indices."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise _missing(root / "train", "expected the image-folder layout train/<class>/*.jpg and test/<class>/*.jpg")
    train_files, train_y, classes = _folder_split(root / "train")
    test_files, test_y, _ = _folder_split(root / "test", classes)
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return Dataset(name, to_x(_cached_images(train_files, cache_dir)), torch.tensor(train_y),
                   to_x(_cached_images(test_files, cache_dir)), torch.tensor(test_y), len(classes), classes)


def cifar10(root, cache_dir=None) -> Dataset:
    root = Path(root)
    folders = next((p for p in (root, root / "cifar10", root / "CIFAR-10-images") if (p / "train").is_dir()), None)
    if folders is not None:
        ds = image_folder(folders, "cifar10", cache_dir)
        if ds.num_classes != 10:
            raise ValueError(f"{folders / 'train'} has {ds.num_classes} class folders; CIFAR-10 has 10")
        return ds
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
        raise _missing(root, "expected cifar-10-batches-bin/ or cifar-10-batches-py/ (data_batch_1..5, test_batch), "
                             "or image folders train/<class>/*.jpg and test/<class>/*.jpg")
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return Dataset("cifar10", to_x(train[0]), torch.from_numpy(train[1]), to_x(test[0]), torch.from_numpy(test[1]), 10)


ROI = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")


def _read_roi(path: Path, row: dict, csv_path: Path) -> np.ndarray:
    """The sign cropped to its ROI, resized to 32x32. Public copies store the images already
    resized while the CSV keeps the original Width/Height/ROI: the ROI is scaled to the stored
    size (cropping with the original numbers would pad the sign with black)."""
    from PIL import Image

    if not path.is_file():
        raise _missing(path, f"listed in {csv_path}")
    try:
        box = [float(row[k]) for k in ROI]
        width, height = float(row["Width"]), float(row["Height"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{csv_path}: row for {row.get('Filename')!r} needs numeric Width, Height and "
                         f"{', '.join(ROI)}") from None
    with Image.open(path) as im:
        im = im.convert("RGB")
        sx, sy = im.size[0] / width, im.size[1] / height
        box = (round(box[0] * sx), round(box[1] * sy), round((box[2] + 1) * sx), round((box[3] + 1) * sy))
        im = im.crop(box).resize((32, 32), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _read_csv(path: Path, needed) -> list:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing} (has {reader.fieldnames}); expected GTSRB's "
                             f"';'-separated annotations")
        return list(reader)


def _labelled_test_csv(root: Path, base: Path, test_dir: Path) -> Path:
    """GT-final_test.csv (with ClassId) comes from a separate archive and lands in Final_Test/,
    Final_Test/Images/ or the root; Final_Test/Images/GT-final_test.test.csv has no labels."""
    places = [test_dir, test_dir.parent, base, root]
    for place in places:
        p = place / "GT-final_test.csv"
        if p.is_file():
            return p
    unlabelled = [str(p) for p in test_dir.glob("GT-final_test.test.csv")]
    hint = f" ({unlabelled[0]} has no ClassId column)" if unlabelled else ""
    raise _missing(test_dir.parent / "GT-final_test.csv",
                   "expected the labelled test annotations GT-final_test.csv (GTSRB_Final_Test_GT.zip) in "
                   f"{', '.join(str(p) for p in places[:3])} or the root{hint}")


def gtsrb(root, max_per_class: int = None) -> Dataset:
    root = Path(root)
    base = root / "GTSRB" if (root / "GTSRB").exists() else root
    train_dir = base / "Final_Training" / "Images"
    test_dir = base / "Final_Test" / "Images"
    if not train_dir.exists():
        raise _missing(train_dir, "expected the official GTSRB layout Final_Training/Images/00000/GT-00000.csv")
    xs, ys = [], []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        try:
            label = int(class_dir.name)
        except ValueError:
            raise ValueError(f"{class_dir}: class folders of GTSRB are numbered (00000 to 00042)") from None
        gt = class_dir / f"GT-{class_dir.name}.csv"
        if not gt.is_file():
            raise _missing(gt, f"the annotations of class {label}")
        for row in _read_csv(gt, ("Filename", "Width", "Height") + ROI)[:max_per_class]:
            xs.append(_read_roi(class_dir / row["Filename"], row, gt))
            ys.append(label)
    if not xs:
        raise ValueError(f"{train_dir} holds no annotated training images")
    if not test_dir.is_dir():
        raise _missing(test_dir, "expected Final_Test/Images (GTSRB_Final_Test_Images.zip)")
    gt = _labelled_test_csv(root, base, test_dir)
    tx, ty = [], []
    for row in _read_csv(gt, ("Filename", "Width", "Height", "ClassId") + ROI):
        tx.append(_read_roi(test_dir / row["Filename"], row, gt))
        ty.append(int(row["ClassId"]))
    to_x = lambda a: torch.from_numpy(np.stack(a).astype(np.float32) / 255.0)  # noqa: E731
    return Dataset("gtsrb", to_x(xs), torch.tensor(ys), to_x(tx), torch.tensor(ty), 43)


DATASETS = ("digits", "cifar10", "gtsrb", "folder")


def load(name: str, path=None, seed: int = 0, cache_dir=None) -> Dataset:
    """`cache_dir` keeps decoded image folders as safetensors (None: decode every time)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return digits(seed)
    if path is None:
        raise ValueError(f"dataset {name!r} needs --data-path pointing at a local copy")
    if name == "cifar10":
        return cifar10(path, cache_dir)
    if name == "gtsrb":
        return gtsrb(path)
    return image_folder(path, "folder", cache_dir)
