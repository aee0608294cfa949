"""Data loaders: offline, safe (no code unpickled), clear errors that name the file; the split."""
import pickle

import numpy as np
import pytest
import torch

from fire_eval import attacks, data, harness


def _fake_cifar_bin(root, n=5):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        rec.tofile(root / name)


def _image_tree(root, classes=("cat", "dog"), per_class=2, size=32, splits=("train", "test")):
    from PIL import Image

    for split in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                name = f"{i:04d}.jpg" if size == 32 else f"{i}.png"
                Image.new("RGB", (size, size), (200 * c, 50, 100)).save(d / name)


HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"


def _sign(size, roi, scale=1.0):
    """A red sign inside roi (inclusive corners, in original pixels) on blue, stored at size*scale."""
    from PIL import Image

    im = Image.new("RGB", (size, size), (0, 0, 255))
    x1, y1, x2, y2 = roi
    im.paste((255, 0, 0), (x1, y1, x2 + 1, y2 + 1))
    if scale != 1.0:
        im = im.resize((round(size * scale), round(size * scale)), Image.NEAREST)
    return im


def _gtsrb_tree(root, labelled_at="images", scale=1.0, unlabelled=True):
    size, roi = 64, (8, 8, 55, 55)
    train = root / "GTSRB" / "Final_Training" / "Images"
    test = root / "GTSRB" / "Final_Test" / "Images"
    row = f"{size};{size};{';'.join(map(str, roi))}"
    for c in (0, 3):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        _sign(size, roi, scale).save(d / "00000_00000.ppm")
        (d / f"GT-{c:05d}.csv").write_text(f"{HEADER};ClassId\n00000_00000.ppm;{row};{c}\n")
    test.mkdir(parents=True)
    _sign(size, roi, scale).save(test / "00000.ppm")
    if unlabelled:  # what GTSRB_Final_Test_Images.zip ships: no ClassId
        (test / "GT-final_test.test.csv").write_text(f"{HEADER}\n00000.ppm;{row}\n")
    where = {"images": test, "final_test": test.parent, "root": root}.get(labelled_at)
    if where is not None:
        (where / "GT-final_test.csv").write_text(f"{HEADER};ClassId\n00000.ppm;{row};3\n")


def test_digits_is_embedded_and_seeded():
    a, b = data.digits(seed=0), data.digits(seed=0)
    assert a.x_train.shape[1:] == (3, 32, 32) and a.num_classes == 10
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert torch.equal(a.y_test, b.y_test)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="Final_Training"):
        data.gtsrb(tmp_path)
    with pytest.raises(ValueError, match="data-path"):
        data.load("cifar10", None)


def test_cifar10_binary_batches(tmp_path):
    _fake_cifar_bin(tmp_path / "cifar-10-batches-bin")
    ds = data.cifar10(tmp_path)
    assert ds.x_train.shape == (25, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert ds.y_train.max() < 10


def test_cifar10_python_batches_and_refusal_of_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, f)
    ds = data.cifar10(tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_test.tolist() == [1, 2]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.cifar10(tmp_path)


def test_gtsrb_official_layout(tmp_path):
    from PIL import Image

    train = tmp_path / "GTSRB" / "Final_Training" / "Images"
    test = tmp_path / "GTSRB" / "Final_Test" / "Images"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"
    for c in (0, 1):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        Image.new("RGB", (40, 40), (255 * c, 0, 0)).save(d / "00000_00000.ppm")
        (d / f"GT-{c:05d}.csv").write_text(f"{header};ClassId\n00000_00000.ppm;40;40;5;5;35;35;{c}\n")
    test.mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(test / "00000.ppm")
    (test / "GT-final_test.csv").write_text(f"{header};ClassId\n00000.ppm;40;40;5;5;35;35;1\n")
    ds = data.gtsrb(tmp_path)
    assert ds.x_train.shape == (2, 3, 32, 32) and ds.y_train.tolist() == [0, 1] and ds.num_classes == 43
    assert ds.x_train[1, 0].mean() > 0.99 and ds.x_test[0, 1].mean() > 0.99


def test_split_is_random_and_disjoint_on_a_class_ordered_test_set():
    """Image folders list the test set class by class: the defender's half and the evaluation half
    must each hold every class, and share no image."""
    n, classes = 400, 10
    y = torch.arange(classes).repeat_interleave(n // classes)  # class-ordered, as folders load
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 8).contiguous() / n
    ds = data.Dataset("ordered", x[:0], y[:0], x, y, classes)
    cfg = harness.RunConfig(n_pairs=16, n_poison_seen=64)
    held, (ec, ey), (ep, epy), stream = harness.split(cfg, ds, attacks.build("blended"))
    ids = lambda t: set((t[:, 0, 0, 0] * n).round().long().tolist())  # noqa: E731
    assert set(ey.tolist()) == set(range(classes)) and set(epy.tolist()) == set(range(1, classes))
    assert len(ids(held.clean)) == len(held.clean) == n // 2 and len(ids(ec)) == n // 2
    assert ids(held.clean).isdisjoint(ids(ec)) and ids(held.pairs[0]) <= ids(held.clean)
    assert len(set(y[sorted(ids(held.pairs[0]))].tolist())) > 3  # pairs from many classes, not the first
    assert len(held.pairs[0]) == 16 and len(held.flagged) == 64 and torch.equal(stream[:64], held.flagged)
    assert len(ep) == len(epy) == int((ey != 0).sum())
    # the pool of pairs the harness draws from: its first n_pairs are the pairs; other draws are
    # other rows of it, twin and triggered image still together
    twins, triggered = held.pool
    assert torch.equal(twins[:16], held.pairs[0]) and torch.equal(triggered[:16], held.pairs[1])
    assert held.drawn(0, 16) is held
    other = held.drawn(1, 16)
    assert torch.equal(other.drawn(0, 16).pairs[0], other.pairs[0]) and other.flagged is held.flagged
    where = [next(i for i in range(len(twins)) if torch.equal(twins[i], t)) for t in other.pairs[0]]
    assert len(set(where)) == 16 and set(where) != set(range(16))
    assert all(torch.equal(triggered[i], p) for i, p in zip(where, other.pairs[1], strict=True))
    assert torch.equal(held.drawn(1, 16).pairs[1], other.pairs[1])  # seeded by the draw


def test_image_folders_labels_from_sorted_class_names(tmp_path):
    _image_tree(tmp_path, classes=("dog", "cat"), size=32)
    ds = data.load("folder", tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.y_train.tolist() == [0, 0, 1, 1]
    assert ds.x_train[0, 0].mean() > 0.7 and ds.x_train[2, 0].mean() < 0.1  # cat (made with red 200) is class 0


def test_image_folders_resize_other_sizes_and_cache(tmp_path):
    _image_tree(tmp_path / "d", size=48)
    ds = data.image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert ds.x_test.shape == (4, 3, 32, 32)
    cached = list((tmp_path / "cache").glob("images-*.safetensors"))
    assert len(cached) == 2  # train and test
    again = data.image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert torch.equal(again.x_train, ds.x_train)


def test_cifar10_accepts_the_image_folder_layout(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _image_tree(tmp_path / "cifar10", classes=classes, per_class=1)
    ds = data.cifar10(tmp_path)  # finds cifar10/train and cifar10/test
    assert ds.name == "cifar10" and ds.classes == classes and ds.y_train.tolist() == list(range(10))
    _image_tree(tmp_path / "three", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(ValueError, match="CIFAR-10 has 10"):
        data.cifar10(tmp_path / "three")


def test_image_folder_errors_name_the_file(tmp_path):
    _image_tree(tmp_path / "a", splits=("train",))
    with pytest.raises(FileNotFoundError, match="test"):
        data.image_folder(tmp_path / "a")
    _image_tree(tmp_path / "b", classes=("cat", "dog"))
    (tmp_path / "b" / "test" / "dog").rename(tmp_path / "b" / "test" / "wolf")
    with pytest.raises(ValueError, match="wolf"):
        data.image_folder(tmp_path / "b")
    _image_tree(tmp_path / "c")
    (tmp_path / "c" / "train" / "cat" / "0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="0000.jpg is not a readable image"):
        data.image_folder(tmp_path / "c")
    (tmp_path / "e" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        data.image_folder(tmp_path / "e")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet", tmp_path)


@pytest.mark.parametrize("labelled_at", ["images", "final_test", "root"])
def test_gtsrb_finds_the_labelled_test_csv_wherever_it_was_unpacked(tmp_path, labelled_at):
    _gtsrb_tree(tmp_path, labelled_at)
    ds = data.gtsrb(tmp_path)
    assert ds.y_train.tolist() == [0, 3] and ds.y_test.tolist() == [3] and ds.num_classes == 43


def test_gtsrb_without_labels_is_a_clear_error(tmp_path):
    _gtsrb_tree(tmp_path, labelled_at=None)
    with pytest.raises(FileNotFoundError, match="GT-final_test.csv.*has no ClassId"):
        data.gtsrb(tmp_path)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gtsrb_crops_the_roi_scaled_to_the_stored_size(tmp_path, scale):
    """Stored at 32x32 while the CSV keeps 64x64 and its ROI: the crop is the sign, not black."""
    _gtsrb_tree(tmp_path, scale=scale)
    ds = data.gtsrb(tmp_path)
    for x in (ds.x_train[0], ds.x_test[0]):
        assert x[0].min() > 0.8 and x[2].max() < 0.2  # red everywhere: no black padding, no blue border


def test_gtsrb_malformed_files_are_clear_errors(tmp_path):
    _gtsrb_tree(tmp_path)
    gt = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00003" / "GT-00003.csv"
    gt.write_text("Filename;Width\n00000_00000.ppm;64\n")
    with pytest.raises(ValueError, match="GT-00003.csv lacks the column"):
        data.gtsrb(tmp_path)
    gt.write_text(f"{HEADER};ClassId\nmissing.ppm;64;64;8;8;55;55;3\n")
    with pytest.raises(FileNotFoundError, match="missing.ppm"):
        data.gtsrb(tmp_path)
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="GT-00003.csv"):
        data.gtsrb(tmp_path)
