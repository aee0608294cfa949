"""Property-based tests (hypothesis): the op against the fp64 reference over random shapes,
strides, dtypes, modes, forms and values on every backend; `Profile.load` over random
corruptions of a saved file (each is refused or loads bit-identical, never anything else)."""
import math
import struct

import pytest
import torch
from helpers import make_slope

import fire_repair as fr

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# the backend fixture sets FIRE_BACKEND once per test, the same for every example
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def op_cases(draw):
    n = draw(st.integers(0, 4))
    feat = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    per_position = draw(st.booleans()) and len(feat) >= 1
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(fr.MODES))
    k = draw(st.integers(1, 17))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced", "row_strided", "transposed"]))
    cd = None
    if per_position:
        cd = draw(st.integers(1, len(feat)))
        cd = draw(st.sampled_from([cd, cd - len(feat) - 1]))  # positive or negative spelling
    perm = draw(st.permutations(range(1, len(feat) + 1)))
    return dict(n=n, feat=feat, dtype=dtype, mode=mode, k=k, seed=seed, scale=scale, layout=layout, cd=cd,
                perm=[0, *perm], center=draw(st.booleans()), tau=draw(st.booleans()))


def _build(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    shape = [c["n"], *c["feat"]]
    if c["layout"] == "permuted":  # dense in another order (e.g. channels_last)
        phys = [shape[p] for p in c["perm"]]
        inverse = [c["perm"].index(d) for d in range(len(shape))]
        x = torch.randn(phys, generator=g).permute(*inverse)
    elif c["layout"] == "sliced":  # last dim at stride 2
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    elif c["layout"] == "row_strided":
        x = torch.randn(2 * shape[0], *shape[1:], generator=g)[::2]
    elif c["layout"] == "transposed" and len(shape) >= 3:
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    else:
        x = torch.randn(shape, generator=g)
    x = (x * c["scale"]).to(device=device, dtype=c["dtype"])
    cd = c["cd"]
    D = math.prod(c["feat"]) if cd is None else x.shape[cd]
    V = torch.randn(c["k"], D, generator=g) / D**0.5
    a = torch.rand(c["k"], generator=g) * 2
    mu = c["scale"] * 0.3 * torch.randn(D, generator=g) if c["center"] else None
    if mu is not None and cd is None and torch.rand(1, generator=g).item() < 0.5:
        mu = mu.reshape(c["feat"])  # the feature-shaped spelling
    tau = c["scale"] * 0.5 * torch.randn(c["k"], generator=g) if c["mode"] == "clamp" and c["tau"] else None
    slope = make_slope(c["mode"], c["k"], device, seed=c["seed"])
    return x, *(None if t is None else t.to(device) for t in (V, a, mu, tau)), slope


@SETTINGS
@given(case=op_cases())
def test_op_matches_the_reference(backend, case):
    x, V, a, mu, tau, slope = _build(case, backend)
    mode, cd = case["mode"], case["cd"]
    out, scores = torch.ops.fire.repair_with_scores(x, V, a, mu, tau, mode, cd, slope)
    exact, ref_scores = fr.repair_reference(x.double(), V, a, mu, tau, mode, channel_dim=cd, slope=slope)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    lead = x.shape[0:1] if cd is None else tuple(s for d, s in enumerate(x.shape) if d != cd % x.dim())
    assert scores.shape == (*lead, V.shape[0]) and scores.dtype == torch.float32
    if x.numel() == 0:
        return
    tol = OUT_TOL[x.dtype]
    big = max(1.0, x.double().abs().max().item(), exact.abs().max().item())
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * big)
    # fp32 dot products: error grows with the sum of |terms|
    terms = float(ref_scores.abs().max()) + big * V.abs().sum(1).max().item()
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-5 * terms)
    torch.testing.assert_close(torch.ops.fire.repair(x, V, a, mu, tau, mode, cd, slope), out,
                               rtol=0 if x.device.type == "cpu" else 2e-6,
                               atol=0 if x.device.type == "cpu" else 2e-6 * big)


# ----------------------------------------------------------------------------- profiles

@pytest.fixture(scope="module")
def saved_profile(tmp_path_factory):
    from helpers import identity_model, planted

    model = identity_model()
    clean, poisoned, _ = planted(n=40, k=2)
    est = fr.Estimator(model, ["feat"], k=2)
    est.observe_pairs(clean, poisoned)
    profile = est.profile(mode="clamp", alpha=[1.0, 0.5])
    path = tmp_path_factory.mktemp("profile") / "p.safetensors"
    profile.save(path)
    return model, path.read_bytes(), fr.Profile.load(path, model)


def _same(a, b) -> bool:
    if a.layer_names != b.layer_names or a.fingerprint != b.fingerprint or a.info != b.info:
        return False
    for x, y in zip(a.layers, b.layers, strict=True):
        if x.mode != y.mode or x.channel_dim != y.channel_dim:
            return False
        tx, ty = x.tensors(), y.tensors()
        if tx.keys() != ty.keys() or any(not torch.equal(tx[k], ty[k]) or tx[k].dtype != ty[k].dtype for k in tx):
            return False
    return True


@st.composite
def corruptions(draw, size: int, header: int):
    kind = draw(st.sampled_from(["bytes", "header_bytes", "truncate", "insert", "append"]))
    if kind in ("bytes", "header_bytes"):
        hi = header - 1 if kind == "header_bytes" else size - 1
        edits = draw(st.lists(st.tuples(st.integers(0, hi), st.integers(0, 255)), min_size=1, max_size=6))
        return kind, edits
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "insert":
        return kind, (draw(st.integers(0, size)), draw(st.binary(min_size=1, max_size=16)))
    return kind, draw(st.binary(min_size=1, max_size=64))


def _apply(data: bytes, corruption) -> bytes:
    kind, arg = corruption
    out = bytearray(data)
    if kind in ("bytes", "header_bytes"):
        for pos, value in arg:
            out[pos] = value
        return bytes(out)
    if kind == "truncate":
        return bytes(out[:arg])
    if kind == "insert":
        pos, blob = arg
        return bytes(out[:pos] + blob + out[pos:])
    return bytes(out) + arg


def test_profile_load_refuses_or_reproduces_every_random_corruption(saved_profile, tmp_path):
    model, data, original = saved_profile
    header = 8 + struct.unpack("<Q", data[:8])[0]
    outcomes = {"refused": 0, "identical": 0}

    @settings(max_examples=300, deadline=None)
    @given(corruption=corruptions(len(data), header))
    def check(corruption):
        path = tmp_path / "c.safetensors"
        path.write_bytes(_apply(data, corruption))
        try:
            loaded = fr.Profile.load(path, model)
        except fr.ProfileError:
            outcomes["refused"] += 1
            return
        assert _same(loaded, original), f"{corruption} loaded as something else"
        outcomes["identical"] += 1

    check()
    print(f"profile corruptions: {outcomes}")
    assert outcomes["refused"] > 0
