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
    path = tmp_path / "p.safetensors"
    profile.save(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    layers = json.loads(meta["layers"])
    layers[0]["mode"] = "project"  # a clamp profile relabelled: its tau no longer fits
    meta["layers"] = json.dumps(layers)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(fr.ProfileError, match="tau"):
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
        fr.LayerRepair(**kwargs)
