"""Hardening, round two: estimator checkpoints and merges that cannot be trusted are refused
with an error that names the problem; a property-based test drives random corruptions: each is
refused or loads to the same profile."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fire_repair as fr


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _estimator(model=None, per_position=False):
    model = model or _model()
    if per_position:
        model = nn.Sequential(nn.Conv1d(2, 4, 1)).eval()
    est = fr.Estimator(model, ["0"] if per_position else ["1"], per_position=per_position)
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 5) if per_position else (3, 6)
    for _ in range(8):
        est.observe(torch.randn(*shape, generator=g), poisoned=False)
        est.observe(torch.randn(*shape, generator=g) + 2.0, poisoned=True)
    return est


MODEL = _model()
STATE = _estimator(MODEL).state_dict()


def _fresh():
    return fr.Estimator(MODEL, ["1"])


def _profile(est):
    p = est.profile(mode="clamp", alpha=1.0, source="unpaired", with_fingerprint=False)
    return {k: v for k, v in p.layers[0].tensors().items()}


REF = _profile(_fresh().load_state_dict(STATE))


def test_round_trip():
    got = _profile(_fresh().load_state_dict(STATE))
    for k, v in REF.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("value", [-16, 2])
def test_n_clean_negated_or_doubled_is_refused(value):
    state = dict(STATE)
    state["1/n_clean"] = state["1/n_clean"] * value
    with pytest.raises(ValueError, match="n_clean|checksum"):
        _fresh().load_state_dict(state)


def test_missing_key_is_named():
    state = {k: v for k, v in STATE.items() if k != "1/settings"}
    with pytest.raises(ValueError, match="settings"):
        _fresh().load_state_dict(state)


def test_int_where_a_tensor_belongs_is_named():
    state = dict(STATE)
    state["1/n_clean"] = 5
    with pytest.raises((TypeError, ValueError), match="n_clean"):
        _fresh().load_state_dict(state)


def test_nan_in_a_sum_is_named():
    state = dict(STATE)
    state["1/sum_clean"] = state["1/sum_clean"].clone()
    state["1/sum_clean"][0] = float("nan")
    with pytest.raises(ValueError, match="sum_clean|checksum"):
        _fresh().load_state_dict(state)


def test_checkpoint_without_checksum_needs_consent():
    state = {k: v for k, v in STATE.items() if k != "1/sha256"}
    with pytest.raises(ValueError, match="allow_unverified"):
        _fresh().load_state_dict(state)
    got = _profile(_fresh().load_state_dict(state, allow_unverified=True))
    assert all(torch.equal(got[k], v) for k, v in REF.items())


def test_checkpoint_carries_an_integrity_check():
    state = dict(STATE)
    state["1/sum_poison"] = state["1/sum_poison"] * 1.01
    with pytest.raises(ValueError, match="checksum"):
        _fresh().load_state_dict(state)


def test_merge_refuses_another_model():
    with pytest.raises(ValueError, match="model"):
        _estimator(MODEL).merge(_estimator(_model(seed=5)))


def test_merge_refuses_layers_it_does_not_watch():
    mine = fr.Estimator(MODEL, ["1"])
    other = fr.Estimator(MODEL, ["1", "2"])
    other.observe(torch.randn(4, 6), poisoned=False)
    with pytest.raises(ValueError, match="does not watch"):
        mine.merge(other)
    mine.load_state_dict(mine.state_dict())  # still loads its own checkpoint


def test_merge_refuses_per_position_state_into_flattened():
    flat = fr.Estimator(nn.Sequential(nn.Conv1d(2, 4, 1)).eval(), ["0"])
    pp = _estimator(per_position=True)
    pp.model = flat.model
    with pytest.raises(ValueError, match="per.position|flattened"):
        flat.merge(pp)
    with pytest.raises(ValueError, match="per.position|flattened"):
        flat.load_state_dict(pp.state_dict())


# ----------------------------------------------------------------------------- property-based

KEYS = sorted(STATE)


def _corrupt(state, key, how, value):
    state = dict(state)
    t = state[key]
    if how == "drop":
        del state[key]
    elif how == "int":
        state[key] = int(value) if value == value and abs(value) < 1e9 else 7
    elif how == "scale":
        state[key] = t * value
    elif how == "set":
        u = t.clone()
        if u.numel() and not u.dtype.is_floating_point:
            u.view(-1)[0] = int(value) if value == value and abs(value) < 1e9 else -3
        elif u.numel():
            u.view(-1)[0] = value
        state[key] = u
    elif how == "reshape":
        state[key] = t.reshape(-1)[:-1] if t.numel() > 1 else t.reshape(1, -1).repeat(2, 1)
    elif how == "dtype":
        state[key] = t.to(torch.float16 if not t.dtype.is_floating_point else torch.int32)
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), how=st.sampled_from(["drop", "int", "scale", "set", "reshape", "dtype"]),
       value=st.sampled_from([-16.0, -1.0, 0.0, 0.5, 2.0, 1e30, float("nan"), float("inf")]))
def test_random_checkpoint_corruption_is_refused_or_loads_the_same(key, how, value):
    state = _corrupt(STATE, key, how, value)
    try:
        est = _fresh().load_state_dict(state)
    except (ValueError, TypeError) as e:
        assert str(e)  # refused, with a message
        return
    got = _profile(est)
    for k, v in REF.items():
        assert torch.equal(got[k], v), (key, how, value, k)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_other=st.integers(0, 3), other_layers=st.sampled_from([["1"], ["2"], ["1", "2"]]),
       same_model=st.booleans())
def test_random_merges_are_refused_or_equal_the_union(n_other, other_layers, same_model):
    mine = _fresh().load_state_dict(STATE)
    other = fr.Estimator(MODEL if same_model else _model(seed=9), other_layers)
    g = torch.Generator().manual_seed(n_other)
    for _ in range(n_other):
        other.observe(torch.randn(3, 6, generator=g), poisoned=False)
    try:
        mine.merge(other)
    except ValueError as e:
        assert str(e)
        assert not same_model or other_layers != ["1"]
        return
    assert same_model and set(other.stats) <= set(mine.layers)
    reloaded = _fresh().load_state_dict(mine.state_dict())  # its own checkpoint loads
    assert reloaded.stats["1"].n_clean == STATE["1/n_clean"].item() + 3 * n_other


COUNT_KEYS = [k for k in KEYS if k.split("/")[1] in ("n_clean", "n_poison", "n_pairs") or k.endswith(".seen")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_of_a_checkpoint_without_checksum_is_refused_or_loads_the_same(data):
    """An earlier release's checkpoint has no checksum; the checks of keys, kinds, shapes and
    counts (each count against the rows its sketch and sample saw) still hold."""
    how = data.draw(st.sampled_from(["drop", "int", "reshape", "dtype", "set", "scale"]))
    keys = [k for k in KEYS if not k.endswith("/sha256")] if how in ("drop", "int", "reshape", "dtype") else COUNT_KEYS
    key = data.draw(st.sampled_from(keys))
    value = data.draw(st.sampled_from([-16.0, -1.0, 0.0, 0.5, 2.0, 3.0, 1e30, float("nan")]))
    state = _corrupt({k: v for k, v in STATE.items() if not k.endswith("/sha256")}, key, how, value)
    try:
        est = _fresh().load_state_dict(state, allow_unverified=True)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    got = _profile(est)
    for k, v in REF.items():
        assert torch.equal(got[k], v), (key, how, value, k)
