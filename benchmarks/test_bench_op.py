"""The op alone against the same maths in eager PyTorch and under torch.compile, and a
device-to-device copy of the same tensor (the bandwidth ceiling), side by side in one run.

Bytes counted are the minimal algorithm's: x read once and out written once."""
import os

import pytest
import torch
from conftest import DEVICE, FULL, SMOKE, compiled_call, run_timed

import fire_repair as fr

# each stage output of a PreAct-ResNet-18 on 32x32 inputs, and linear features
SHAPES = {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "layer4": (512, 4, 4),
          "linear512": (512,), "linear4096": (4096,)}


def _cases():
    if SMOKE:
        return [("layer3", 8, 4, torch.float32, "clamp"), ("linear512", 4, 1, torch.bfloat16, "project"),
                ("layer3", 8, 1, torch.float32, "invert")]
    batches = [1, 32, 256, 1024] if (DEVICE == "cuda" or FULL) else [1, 256]
    if os.environ.get("FIRE_BENCH_BATCHES"):  # e.g. "1,256,1024": a shorter GPU session
        batches = [int(b) for b in os.environ["FIRE_BENCH_BATCHES"].split(",")]
    cases = [(s, n, k, dt, "clamp") for s in SHAPES for n in batches for k in (1, 4, 16)
             for dt in (torch.float32, torch.bfloat16)]
    cases += [("layer2", 256, 4, torch.float32, m) for m in ("shift", "project", "gated", "invert")]
    return cases


CASES = _cases()
# fire-compiled: our op called from a compiled function (conftest.compiled_call), at batch 1
IMPLS = ["fire", "fire-compiled", "eager", "compile", "copy"] + (["fire-cuda-native"] if DEVICE == "cuda" else [])


def _inputs(shape, n, k, dtype, mode):
    g = torch.Generator().manual_seed(0)
    D = 1
    for s in shape:
        D *= s
    x = torch.randn((n, *shape), generator=g).to(DEVICE, dtype)
    V = torch.linalg.qr(torch.randn(D, k, generator=g))[0].T.contiguous().to(DEVICE)
    a = torch.rand(k, generator=g).to(DEVICE)
    mu = (0.1 * torch.randn(D, generator=g)).to(DEVICE)
    if len(shape) == 3:  # what conv nets produce on GPU; directions and centre in the same order,
        # as RepairModule keeps them (every implementation gets the same tensors)
        x = x.contiguous(memory_format=torch.channels_last)
        V = V.reshape(k, *shape).contiguous(memory_format=torch.channels_last)
        mu = mu.reshape(shape).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    tau = torch.rand(k, generator=g).to(DEVICE) if mode in fr.TAU_MODES else None
    # invert: a blend's slope on the first direction; tau = U(0, 1) flags about a third of these
    # rows, far more than a served model sees (only triggered inputs), the costlier case
    slope = torch.tensor([-0.2] + [0.0] * (k - 1), device=DEVICE) if mode == "invert" else None
    return x, V, a, mu, tau, slope


def _eager(x, V, a, mu, tau, mode, slope=None):
    return fr.repair_reference(x, V, a, mu, tau, mode, compute_dtype=torch.float32, slope=slope)[0]


_compiled = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1]}-K{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_op(benchmark, case, impl, use_backend):
    name, n, k, dtype, mode = case
    shape = SHAPES[name]
    x, V, a, mu, tau, slope = _inputs(shape, n, k, dtype, mode)
    if impl == "fire":
        fn = lambda: torch.ops.fire.repair(x, V, a, mu, tau, mode, None, slope)  # noqa: E731
    elif impl == "fire-cuda-native":
        use_backend("cuda")
        fn = lambda: torch.ops.fire.repair(x, V, a, mu, tau, mode, None, slope)  # noqa: E731
    elif impl == "fire-compiled":
        fn = compiled_call(n, (x, V, a, mu, tau, mode, None, slope))
    elif impl == "eager":
        fn = lambda: _eager(x, V, a, mu, tau, mode, slope)  # noqa: E731
    elif impl == "compile":
        compiled = torch.compile(_eager, dynamic=False)
        fn = lambda: compiled(x, V, a, mu, tau, mode, slope)  # noqa: E731
    else:
        fn = lambda: x.clone()  # noqa: E731
    benchmark.group = f"op {name} N={n} K={k} {dtype} {mode}"
    run_timed(benchmark, fn, bytes_moved=2 * x.numel() * x.element_size(),
              extra={"impl": impl, "case": name, "shape": list(shape), "N": n, "K": k, "dtype": str(dtype),
                     "mode": mode, "backend": os.environ.get("FIRE_BACKEND", "auto")})
