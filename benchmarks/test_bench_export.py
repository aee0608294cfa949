"""The exported package (`fr.export`, AOTInductor) against eager, with and without the repair,
side by side: what serving a repaired model costs, and what exporting it buys. CPU only: the
CUDA export path is not yet tested (docs/usage.md)."""
import pytest
import torch
from conftest import DEVICE, SMOKE, run_timed

import fire_repair as fr
from fire_eval import models

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="fr.export is tested on the CPU only")
BATCHES = [2] if SMOKE else [1, 64]
ARCH, LAYER = "cnn", "block2"


def _clamp_profile(model, k=4):
    """A clamp repair of k orthonormal random directions at LAYER (its cost does not depend on them)."""
    g = torch.Generator().manual_seed(0)
    h = {}
    hook = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: h.__setitem__("o", o))
    model(torch.zeros(1, 3, 32, 32))
    hook.remove()
    fs = tuple(h["o"].shape[1:])
    V = torch.linalg.qr(torch.randn(h["o"][0].numel(), k, generator=g))[0].T.reshape(k, *fs).contiguous()
    layer = fr.LayerProfile(name=LAYER, mode="clamp", directions=V, alpha=torch.ones(k), center=torch.zeros(fs),
                            tau=torch.full((k,), 3.0), score_scale=torch.ones(k))
    return fr.Profile(layers=[layer])


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    """{(runtime, repaired): callable}: the model eager and as a package, plain and repaired."""
    torch.manual_seed(0)
    model = models.build(ARCH, 10, 8 if SMOKE else 32).eval()
    example = torch.randn(max(BATCHES), 3, 32, 32)
    root = tmp_path_factory.mktemp("export")
    out = {}
    plain = torch._inductor.aoti_load_package(str(fr.export(model, example, root / "plain.pt2", max_batch=64,
                                                            require_repair=False)))
    out[("eager", False)], out[("package", False)] = model, plain
    repaired = models.build(ARCH, 10, 8 if SMOKE else 32).eval()
    repaired.load_state_dict(model.state_dict())
    fr.attach(repaired, _clamp_profile(repaired), check_fingerprint=False)
    out[("eager", True)] = repaired
    out[("package", True)] = torch._inductor.aoti_load_package(str(fr.export(repaired, example,
                                                                             root / "repaired.pt2", max_batch=64)))
    x = torch.randn(3, 3, 32, 32)
    for repaired_ in (False, True):  # the packages compute what eager does
        torch.testing.assert_close(out[("package", repaired_)](x), out[("eager", repaired_)](x), atol=1e-4, rtol=1e-4)
    return out


@pytest.mark.parametrize("repaired", [False, True], ids=["plain", "repaired"])
@pytest.mark.parametrize("runtime", ["eager", "package"])
@pytest.mark.parametrize("batch", BATCHES)
def test_export(benchmark, runtimes, batch, runtime, repaired):
    fn = runtimes[(runtime, repaired)]
    x = torch.randn(batch, 3, 32, 32)
    benchmark.group = f"export {ARCH} batch={batch}"
    run_timed(benchmark, lambda: fn(x), extra={"arch": ARCH, "layer": LAYER, "batch": batch, "runtime": runtime,
                                              "with_repair": repaired})
