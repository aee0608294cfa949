"""Production hardening: no stale results, no leaks, the same answer on every backend for
non-finite and extreme inputs, values checked where the tensors are owned, clear errors."""
import gc
import weakref

import pytest
import torch
from torch import nn

import fire_repair as fr
from fire_repair.profile import LayerProfile, Profile


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize() / 2**20


def _expected(x, V, a, mu, tau, mode, cd=None):
    return fr.repair_reference(x, V, a, mu, tau, mode, channel_dim=cd)[0]


# ----------------------------------------------------------------------------- stale results
# Each write below bypasses the tensor's version counter; the op must see the new values.

def _write_data_copy(V, W):
    V.data.copy_(W)


def _write_numpy(V, W):
    V.numpy()[...] = W.numpy()


def _write_storage(V, W):
    torch.tensor([], dtype=V.dtype, device=V.device).set_(V.untyped_storage(), 0, V.shape, V.stride()).copy_(W)


def _assign_data(V, W):
    V.data = W.clone()


@pytest.mark.parametrize("write", [_write_data_copy, _write_numpy, _write_storage, _assign_data],
                         ids=["data.copy_", "numpy", "untyped_storage", "data ="])
@pytest.mark.parametrize("layout", ["flat", "channels_last_4d_directions", "fp16_directions", "per_position"])
def test_writes_that_bypass_version_counters_are_seen(backend, write, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 7, generator=g)
    cd = 1 if layout == "per_position" else None
    if layout == "channels_last_4d_directions":
        x = x.contiguous(memory_format=torch.channels_last)
        V = torch.randn(2, 3, 5, 7, generator=g)
    elif layout == "per_position":
        V = torch.randn(2, 3, generator=g)
    else:
        V = torch.randn(2, 105, generator=g)
    if layout == "fp16_directions":
        V = V.half()
    W = torch.randn(V.shape, generator=g).to(V.dtype)
    x, V, W = x.to(backend), V.to(backend), W.to(backend)
    a = torch.ones(2, device=backend)
    if backend != "cpu" and write is _write_numpy:
        pytest.skip("numpy views exist for CPU tensors only")
    torch.ops.fire.repair(x, V, a, None, None, "project", cd)  # a first call with the old values
    write(V, W)
    out = torch.ops.fire.repair(x, V, a, None, None, "project", cd)
    torch.testing.assert_close(out, _expected(x, W, a, None, None, "project", cd), rtol=2e-3, atol=2e-3)


def test_nan_written_past_the_version_counter_is_the_ieee_answer_and_check_repairs_finds_it(backend):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).to(backend)
    layer = LayerProfile("1", "project", torch.eye(6)[:2], torch.ones(2), torch.zeros(6))
    fr.attach(model, Profile([layer], fingerprint=fr.fingerprint(model)))
    x = torch.randn(4, 6, device=backend)
    assert torch.isfinite(model(x)).all()
    module = fr.repair_modules(model)["1"]
    module.directions.data[0, 0] = float("nan")
    assert torch.isnan(model(x)).all()  # NaN directions: every row NaN (project), never a stale answer
    with pytest.raises(ValueError, match=r"repair at '1': directions contains NaN or inf"):
        fr.check_repairs(model)


# ----------------------------------------------------------------------------- leaks

def _growth_mib(step, n: int, warmup: int = 200) -> float:
    """Resident memory added by n more calls of step(i), after warm-up calls (allocator pools)."""
    for i in range(warmup):
        step(i)
    gc.collect()
    before = _rss_mib()
    for i in range(n):
        step(i)
    gc.collect()
    return _rss_mib() - before


def test_ten_thousand_fresh_directions_tensors_leave_memory_flat():
    x, a = torch.randn(2, 4096), torch.ones(4)
    refs = []

    def call(i):
        V = torch.randn(4, 4096)  # 64 KiB each: 10,000 kept alive would be 625 MiB
        if i % 500 == 0:
            refs.append(weakref.ref(V))
        torch.ops.fire.repair(x, V, a, None, None, "project")

    assert _growth_mib(call, 10_000) < 32
    assert all(r() is None for r in refs)


@pytest.mark.slow
def test_ten_thousand_attach_detach_cycles_leave_memory_flat():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    layer = LayerProfile("0", "clamp", torch.randn(4, 256), torch.ones(4), torch.zeros(256), tau=torch.zeros(4))
    profile = Profile([layer], fingerprint=fr.fingerprint(model))
    x = torch.randn(2, 64)
    refs = []

    def cycle(i):
        fr.attach(model, profile)
        model(x)
        if i % 500 == 0:
            refs.append(weakref.ref(fr.repair_modules(model)["0"]))
        fr.detach(model)

    assert _growth_mib(cycle, 10_000, warmup=100) < 32
    assert all(r() is None for r in refs), "a detached repair module is still referenced"


# ----------------------------------------------------------------------------- values where owned

def _module(mode="clamp"):
    layer = LayerProfile("l", mode, torch.randn(2, 8), torch.ones(2), torch.zeros(8),
                        tau=torch.zeros(2) if mode == "clamp" else None)
    return layer, fr.RepairModule(layer)


@pytest.mark.parametrize("name,value", [("directions", float("nan")), ("alpha", float("inf")),
                                        ("center", float("-inf")), ("tau", float("nan"))])
def test_load_state_dict_refuses_non_finite_values_before_copying(name, value):
    _, module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd[name].view(-1)[0] = value
    with pytest.raises(ValueError, match=f"{name} contains"):
        module.load_state_dict(sd)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tau_may_be_infinite_but_not_nan():
    _, module = _module()
    sd = module.state_dict()
    sd["tau"] = torch.tensor([float("inf"), 0.0])
    module.load_state_dict(sd)  # inf: that direction never clamps in
    module.check()


def test_load_layer_revalidates_a_layer_edited_after_construction():
    layer, module = _module()
    layer.alpha[0] = float("nan")
    with pytest.raises(fr.ProfileError, match="alpha has non-finite values"):
        module.load_layer(layer)
    assert torch.isfinite(module.alpha).all()


def test_buffers_move_devices_but_keep_fp32_under_dtype_casts():
    layer, module = _module()
    module.to(torch.bfloat16)
    assert module.slope is None  # clamp: no slope buffer
    assert all(getattr(module, n).dtype == torch.float32 for n in module.BUFFERS if n != "slope")
    assert torch.equal(module.directions, layer.directions)
    module.half()
    x = torch.randn(3, 8).half()
    out = module(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, _expected(x, layer.directions, layer.alpha, layer.center, layer.tau, "clamp"),
                               rtol=2e-3, atol=2e-3)


def test_flattened_directions_follow_the_input_layout_once():
    g = torch.Generator().manual_seed(0)
    layer = LayerProfile("l", "project", torch.randn(2, 3, 5, 7, generator=g), torch.ones(2),
                        torch.randn(3, 5, 7, generator=g))
    module = fr.RepairModule(layer)
    x = torch.randn(4, 3, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    out = module(x)
    assert module.directions.is_contiguous(memory_format=torch.channels_last)
    assert module.center.permute(1, 2, 0).is_contiguous()
    torch.testing.assert_close(out, _expected(x, layer.directions, layer.alpha, layer.center, None, "project"))
    assert torch.equal(module.directions, layer.directions)  # same values, other strides
    # and back to contiguous inputs
    y = torch.randn(4, 3, 5, 7, generator=g)
    torch.testing.assert_close(module(y), _expected(y, layer.directions, layer.alpha, layer.center, None, "project"))
    assert module.directions.is_contiguous()


def test_state_dict_is_contiguous_after_following_channels_last(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    layer = LayerProfile("l", "shift", torch.randn(2, 3, 5, 7, generator=g), torch.ones(2),
                         torch.randn(3, 5, 7, generator=g))
    module = fr.RepairModule(layer)
    module(torch.randn(2, 3, 5, 7, generator=g).contiguous(memory_format=torch.channels_last))
    assert not module.directions.is_contiguous()  # follows the input
    save_file(module.state_dict(), str(tmp_path / "m.safetensors"))  # refuses non-contiguous tensors
    other = fr.RepairModule(layer)
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.equal(other.directions, layer.directions) and torch.equal(other.center, layer.center)


# ----------------------------------------------------------------------------- the same answer everywhere

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("mode", fr.MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("form", ["flattened", "per_position", "per_position_nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_x_gives_the_references_answer_on_every_backend(backend, mode, bad, form, dtype):
    """A row with NaN: its scores are NaN; project and clamp spread NaN over the row, shift keeps
    it to the element. inf: the infinities and NaNs of the same IEEE arithmetic. Identical
    non-finite pattern on every backend (finite elements within the dtype's tolerance)."""
    g = torch.Generator().manual_seed(3)
    if form == "flattened":
        x, cd = torch.randn(4, 3, 4, 4, generator=g), None
        V = torch.randn(3, 48, generator=g) / 7
        mu = 0.1 * torch.randn(48, generator=g)
    else:
        x = torch.randn(4, 5, 3, generator=g) if form == "per_position" else torch.randn(4, 3, 5, generator=g)
        cd = -1 if form == "per_position" else 1
        V = torch.randn(3, 3, generator=g) / 2
        mu = 0.1 * torch.randn(3, generator=g)
    x[1].view(-1)[5] = bad
    x[2].view(-1)[0] = bad
    x = x.to(backend, dtype)
    a = torch.tensor([1.0, 0.5, 2.0])
    tau = torch.tensor([0.1, -0.2, 0.0]) if mode == "clamp" else None
    args = [t.to(backend) if t is not None else None for t in (V, a, mu, tau)]
    slope = torch.tensor([-0.2, 0.1, 0.05], device=backend) if mode == "invert" else None
    out, scores = torch.ops.fire.repair_with_scores(x, *args, mode, cd, slope)
    ref, ref_scores = fr.repair_reference(x.double(), *args, mode, channel_dim=cd, slope=slope)
    assert torch.equal(torch.isnan(out.double()), torch.isnan(ref)), "NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(out.double()), torch.isinf(ref)), "inf pattern differs from the reference"
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(torch.isnan(scores), torch.isnan(ref_scores))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_scores_are_centred_not_differences_of_large_products(backend):
    """|mu| ~ 1e4, |x - mu| ~ 0.01, D = 4096: <v, x> - <v, mu> loses everything to cancellation
    (3.3e-3 error against scores of 0.018 in an earlier CPU kernel); <v, x - mu> does not."""
    g = torch.Generator().manual_seed(0)
    D = 4096
    mu = 1e4 * (1 + torch.rand(D, generator=g))
    x = (mu + 0.01 * torch.randn(6, D, generator=g)).float()
    V = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=1)
    args = [t.to(backend) for t in (V, torch.ones(2), mu.float())]
    _, scores = torch.ops.fire.repair_with_scores(x.to(backend), *args, None, "project")
    exact = (x.double() - mu.float().double()) @ V.double().T  # from the fp32 values the op sees
    assert (scores.double().cpu() - exact).abs().max() < 1e-6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_inputs_near_the_fp32_limit(backend):
    """What the op promises: centred values and scores within fp32 range are exact to fp32
    tolerance even for |x| near 3.4e38; beyond it the result is non-finite, never a finite
    wrong value."""
    D = 64
    big = torch.full((D,), 3.0e38)
    V = torch.nn.functional.normalize(torch.ones(1, D), dim=1)
    a = torch.ones(1)
    x = torch.stack([big, big + 0.0, -big]).to(backend)  # rows 0, 1: x == mu; row 2: x - mu overflows
    out, scores = torch.ops.fire.repair_with_scores(x, V.to(backend), a.to(backend), big.to(backend), None,
                                                    "project")
    assert torch.equal(scores[:2].cpu(), torch.zeros(2, 1))
    assert torch.equal(out[:2], x[:2])  # the exact answer: nothing to remove
    assert not torch.isfinite(out[2]).any() and not torch.isfinite(scores[2]).any()


# ----------------------------------------------------------------------------- clear answers

def test_meta_tensors_in_eager_mode_give_shapes():
    x = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    a = torch.ones(2, device="meta")
    out, scores = torch.ops.fire.repair_with_scores(x, torch.empty(2, 60, device="meta"), a, None, None, "project")
    assert out.device.type == "meta" and out.shape == x.shape and out.stride() == x.stride()
    assert scores.shape == (2, 2)
    out, scores = torch.ops.fire.repair_with_scores(x, torch.empty(2, 3, device="meta"), a, None, None, "shift", 1)
    assert scores.shape == (2, 4, 5, 2)


@pytest.mark.parametrize("mode,cd,shape", [("project", None, (3, 2, 3, 3)), ("clamp", None, (4, 7)),
                                           ("project", 1, (2, 3, 4)), ("clamp", -1, (2, 5, 3)),
                                           ("shift", None, (3, 5))])
def test_second_derivatives_with_respect_to_x_match_the_reference(backend, mode, cd, shape):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g)
    D = x0[0].numel() if cd is None else x0.shape[cd]
    V = torch.randn(2, D, generator=g) / D**0.5
    a = 0.5 + torch.rand(2, generator=g)
    mu = 0.1 * torch.randn(x0[0].shape if cd is None else (D,), generator=g)
    tau = torch.full((2,), -0.05) if mode == "clamp" else None
    u = torch.randn(shape, generator=g)
    x0, V, a, mu, u = (t.to(backend) for t in (x0, V, a, mu, u))
    tau = None if tau is None else tau.to(backend)

    def hvp(f):
        x = x0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(x).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad((grad * u).sum(), x)[0]

    ours = hvp(lambda x: torch.ops.fire.repair(x, V, a, mu, tau, mode, cd))
    ref = hvp(lambda x: fr.repair_reference(x, V, a, mu, tau, mode, channel_dim=cd,
                                            compute_dtype=torch.float32)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_double_backward_through_the_directions_says_what_is_missing():
    x = torch.randn(3, 5, requires_grad=True)
    V = torch.randn(2, 5, requires_grad=True)
    out = torch.ops.fire.repair(x, V, torch.ones(2), None, None, "project")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives are implemented with respect to x only"):
        torch.autograd.grad(gx.sum(), V)


def test_select_scores_and_metrics_restore_the_training_flag():
    from fire_eval.metrics import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).train()
    est = fr.Estimator(model, ["1"], k=1)
    est.observe(torch.randn(64, 8), poisoned=False)
    x_clean = torch.randn(8, 8)
    sel = fr.select(est, x_clean, x_clean + 3, alphas=(1.0,), folds=2)
    assert model.training
    predict(model, x_clean)
    assert model.training
    fr.attach(model, sel.profile, check_fingerprint=False)
    fr.backdoor_scores(model, x_clean)
    assert model.training
    with pytest.raises(ValueError, match="batch must be >= 1"):
        fr.backdoor_scores(model, x_clean, batch=0)
