"""End to end: the forward pass of PreAct-ResNet-18 and VGG with and without an attached
profile (eager and compiled), and the per-sample latency of the online step."""
import pytest
import torch
from conftest import DEVICE, FULL, SMOKE, run_timed

import fire_repair as fr
from fire_eval import models

BATCHES = [2] if SMOKE else ([1, 256] if (DEVICE == "cuda" or FULL) else [1, 32])
MODELS = {"preact18": "layer3", "vgg": "stage3"}
COMPILE = DEVICE == "cuda" or FULL


def _random_profile(model, layer, k=4, mode="clamp"):
    g = torch.Generator().manual_seed(0)
    h = {}
    hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: h.__setitem__("o", o))
    model(torch.zeros(1, 3, 32, 32, device=DEVICE))
    hook.remove()
    fs = tuple(h["o"].shape[1:])
    D = h["o"][0].numel()
    V = torch.linalg.qr(torch.randn(D, k, generator=g))[0].T.reshape(k, *fs).contiguous()
    layer_repair = fr.LayerProfile(name=layer, mode=mode, directions=V, alpha=torch.ones(k),
                                  center=torch.zeros(fs), tau=torch.full((k,), 3.0) if mode == "clamp" else None,
                                  score_scale=torch.ones(k))
    return fr.Profile(layers=[layer_repair])


@pytest.mark.parametrize("compiled", [False, True] if COMPILE else [False],
                         ids=["eager", "compiled"][: 2 if COMPILE else 1])
@pytest.mark.parametrize("repaired", [False, True], ids=["plain", "repaired"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_forward(benchmark, arch, batch, repaired, compiled):
    torch.manual_seed(0)
    width = 8 if SMOKE else 64
    model = models.build(arch, 10, width).to(DEVICE).eval()
    if DEVICE == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if repaired:
        fr.attach(model, _random_profile(model, MODELS[arch]), check_fingerprint=False)
    fn_model = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    benchmark.group = f"e2e {arch} batch={batch} {'compiled' if compiled else 'eager'}"
    run_timed(benchmark, lambda: fn_model(x), extra={"arch": arch, "batch": batch, "repaired": repaired,
                                                    "compiled": compiled, "layer": MODELS[arch]})


@pytest.mark.parametrize("arch,layer", [("cnn", "block2"), ("preact18", "layer3")])
def test_online_step(benchmark, arch, layer):
    torch.manual_seed(0)
    model = models.build(arch, 10, 8 if SMOKE else None).to(DEVICE).eval()
    est = fr.Estimator(model, [layer])
    clean = torch.rand(64, 3, 32, 32, device=DEVICE)
    est.observe(clean, poisoned=False)
    poisoned = clean.clone()
    poisoned[..., -3:, -3:] = 1.0
    est.observe(poisoned[:8], poisoned=True)
    online = fr.Online(est, mode="clamp", threshold=None)
    batch = 8
    flags = torch.ones(batch, dtype=torch.bool, device=DEVICE)
    xb = poisoned[:batch]
    benchmark.group = "online step"
    seconds = run_timed(benchmark, lambda: online.step(xb, poisoned=flags),
                        extra={"arch": arch, "layer": layer, "batch": batch})
    benchmark.extra_info["ms_per_sample"] = 1e3 * seconds / batch
    online.close()
