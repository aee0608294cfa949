"""Profile: safetensors round trip, model checks, and refusal of damaged or foreign files."""
import json
import struct

import pytest
import torch
from helpers import identity_model, planted
from safetensors.torch import save_file

import fire_repair as fr


@pytest.fixture
def model_and_profile():
    model = identity_model()
    clean, poisoned, _ = planted(n=50, k=3)
    est = fr.Estimator(model, ["feat"], k=2)
    est.observe_pairs(clean, poisoned)
    return model, est.profile(mode="clamp", alpha=[1.0, 0.5], tau_quantile=0.95)


def _saved(tmp_path, profile):
    """(path, file bytes, header length including its 8-byte size) of the saved profile."""
    path = tmp_path / "p.safetensors"
    profile.save(path)
    data = path.read_bytes()
    return path, data, 8 + struct.unpack("<Q", data[:8])[0]


def test_round_trip(tmp_path, model_and_profile):
    model, profile = model_and_profile
    path = tmp_path / "p.fire.safetensors"
    profile.save(path)
    loaded = fr.Profile.load(path, model)
    assert loaded.layer_names == ["feat"] and loaded.fingerprint == profile.fingerprint
    assert loaded.info == json.loads(json.dumps(profile.info))
    a, b = profile.layer("feat"), loaded.layer("feat")
    assert a.mode == b.mode == "clamp"
    for key, t in a.tensors().items():
        assert torch.equal(t, getattr(b, key)), key


def test_refuses_other_weights_and_missing_layers(tmp_path, model_and_profile):
    model, profile = model_and_profile
    path = tmp_path / "p.safetensors"
    profile.save(path)
    other = identity_model()
    with torch.no_grad():
        other.head.weight.add_(1e-3)
    with pytest.raises(fr.ProfileError, match="fingerprint"):
        fr.Profile.load(path, other)
    fr.Profile.load(path, other, check_fingerprint=False)  # explicit override
    with pytest.raises(fr.ProfileError, match="no layer"):
        fr.Profile.load(path, torch.nn.Sequential(torch.nn.Linear(24, 3)))


def test_truncated_file_is_an_error(tmp_path, model_and_profile):
    _, profile = model_and_profile
    path = tmp_path / "p.safetensors"
    profile.save(path)
    data = path.read_bytes()
    for cut in (4, 40, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(fr.ProfileError):
            fr.Profile.load(bad)


def test_tampered_tensor_bytes_are_refused(tmp_path, model_and_profile):
    _, profile = model_and_profile
    path = tmp_path / "p.safetensors"
    profile.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(fr.ProfileError, match="checksum"):
        fr.Profile.load(path)


def test_tampered_header_is_refused(tmp_path, model_and_profile):
    _, profile = model_and_profile
    path, data, end = _saved(tmp_path, profile)
    header = json.loads(data[8:end])
    meta = header["__metadata__"]
    layers = json.loads(meta["layers"])
    layers[0]["mode"] = "project"  # a clamp profile relabelled: its tau no longer fits
    meta["layers"] = json.dumps(layers)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[end:])
    with pytest.raises(fr.ProfileError, match="checksum"):  # the digest covers the metadata
        fr.Profile.load(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(fr.ProfileError):
        fr.Profile.load(path)


def test_foreign_safetensors_is_not_a_profile(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(fr.ProfileError, match="not a fire profile"):
        fr.Profile.load(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fr.Profile.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("change, text", [
    (dict(alpha=torch.ones(3)), "alpha must have shape"),
    (dict(center=torch.zeros(5)), "center must have shape"),
    (dict(mode="project"), "tau is only used"),
    (dict(tau=None), "needs tau"),
    (dict(directions=torch.full((2, 24), float("nan"))), "non-finite"),
    (dict(mode="bogus"), "mode must be"),
])
def test_layer_validation(model_and_profile, change, text):
    _, profile = model_and_profile
    layer = profile.layer("feat")
    kwargs = dict(name="feat", mode=layer.mode, directions=layer.directions, alpha=layer.alpha, center=layer.center,
                  tau=layer.tau)
    kwargs.update(change)
    with pytest.raises(fr.ProfileError, match=text):
        fr.LayerProfile(**kwargs)


# ----------------------------------------------------------------------------- tampering, as an attacker would

def _rewrite(src, dst, edit_meta=None, edit_tensors=None, rehash=False):
    """Copies a saved profile with edited metadata and/or tensors; `rehash` recomputes the digest
    (an attacker who knows the format), so only the load-time validation stands in the way."""
    from safetensors import safe_open

    from fire_repair.profile import _digest

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if rehash:
        meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _layers_edit(fn):
    def edit(meta):
        layers = json.loads(meta["layers"])
        fn(layers)
        meta["layers"] = json.dumps(layers)
    return edit


METADATA_EDITS = {
    "fingerprint emptied": lambda m: m.__setitem__("fingerprint", ""),
    "fingerprint key renamed": lambda m: m.__setitem__("fingerprinT", m.pop("fingerprint")),
    "mode relabelled": _layers_edit(lambda ls: ls[0].__setitem__("mode", "shift")),
    "layer renamed": _layers_edit(lambda ls: ls[0].__setitem__("name", "head")),
    "info changed": lambda m: m.__setitem__("info", json.dumps({"k": 9})),
}


@pytest.mark.parametrize("edit", list(METADATA_EDITS))
def test_every_metadata_edit_is_refused(tmp_path, model_and_profile, edit):
    model, profile = model_and_profile
    profile.save(tmp_path / "p.safetensors")
    bad = _rewrite(tmp_path / "p.safetensors", tmp_path / "bad.safetensors", edit_meta=METADATA_EDITS[edit])
    with pytest.raises(fr.ProfileError, match="checksum"):
        fr.Profile.load(bad, model)


def _deep(meta):
    meta["layers"] = "[" * 100_000 + "]" * 100_000


REHASHED = {
    "alpha as int64": (None, lambda t: t.__setitem__("0.alpha", t["0.alpha"].long()), "float32"),
    "K = 100": (_layers_edit(lambda ls: ls[0].__setitem__("k", 100)), None, "k must be between"),
    "deeply nested layers": (_deep, None, "malformed"),
    "layers not a list": (lambda m: m.__setitem__("layers", "{}"), None, "non-empty JSON list"),
    "layer missing a field": (_layers_edit(lambda ls: ls[0].pop("mode")), None, "expected"),
    "k as a string": (_layers_edit(lambda ls: ls[0].__setitem__("k", "2")), None, "expected"),
    "info a list": (lambda m: m.__setitem__("info", "[1, 2]"), None, "info must be"),
    "stray tensor": (None, lambda t: t.__setitem__("7.alpha", torch.ones(2)), "belong to no layer"),
    "directions missing": (None, lambda t: t.pop("0.directions"), "lacks directions"),
    "fingerprint emptied": (lambda m: m.__setitem__("fingerprint", ""), None, "no model fingerprint"),
}


@pytest.mark.parametrize("case", list(REHASHED))
def test_rehashed_edits_fail_validation_at_load(tmp_path, model_and_profile, case):
    _, profile = model_and_profile
    profile.save(tmp_path / "p.safetensors")
    meta_edit, tensor_edit, text = REHASHED[case]
    bad = _rewrite(tmp_path / "p.safetensors", tmp_path / "bad.safetensors", meta_edit, tensor_edit, rehash=True)
    with pytest.raises(fr.ProfileError, match=text):
        fr.Profile.load(bad)


def test_a_profile_without_fingerprint_needs_an_explicit_yes(tmp_path, model_and_profile):
    model, profile = model_and_profile
    profile.fingerprint = None
    profile.save(tmp_path / "p.safetensors")
    with pytest.raises(fr.ProfileError, match="allow_other_model"):
        fr.Profile.load(tmp_path / "p.safetensors", model)
    loaded = fr.Profile.load(tmp_path / "p.safetensors", model, allow_other_model=True)
    assert loaded.fingerprint is None


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(fr.ProfileError, match="not a regular file"):
        fr.Profile.load(fifo)
    with pytest.raises(fr.ProfileError, match="not a regular file"):
        fr.Profile.load(tmp_path)


def test_every_flipped_byte_is_refused_or_loads_identically(tmp_path, model_and_profile):
    """Each byte of the header, and every 64th byte of the data, flipped one at a time."""
    model, profile = model_and_profile
    path, data, n_header = _saved(tmp_path, profile)
    original = fr.Profile.load(path, model)
    positions = list(range(n_header)) + list(range(n_header, len(data), 64))
    refused = identical = 0
    bad = tmp_path / "flip.safetensors"
    for i in positions:
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            loaded = fr.Profile.load(bad, model)
        except fr.ProfileError:
            refused += 1
            continue
        assert loaded.layer_names == original.layer_names and loaded.fingerprint == original.fingerprint, i
        assert loaded.info == original.info, i
        for a, b in zip(loaded.layers, original.layers, strict=True):
            assert a.mode == b.mode, i
            for key, t in b.tensors().items():
                assert torch.equal(getattr(a, key), t), (i, key)
        identical += 1
    assert refused + identical == len(positions) and refused > 0
