"""The per-position form of the op (`channel_dim`) against the same maths in eager PyTorch and
under torch.compile, and a copy of the same tensor, side by side in one run. Cases: conv maps
in both memory formats (a direction over channels applied at every position) and transformer
tokens. Bytes counted: x read once and out written once. The rows land in the same table as the
flattened op (summarize.py), with case names starting `pos-`."""
import os

import pytest
import torch
from conftest import DEVICE, FULL, SMOKE, compiled_call, run_timed

import fire_repair as fr

# (logical shape without batch, memory format, channel dim)
SHAPES = {
    "pos-nchw-layer1": ((64, 32, 32), torch.contiguous_format, 1),
    "pos-nhwc-layer1": ((64, 32, 32), torch.channels_last, 1),
    "pos-nchw-layer3": ((256, 8, 8), torch.contiguous_format, 1),
    "pos-nhwc-layer3": ((256, 8, 8), torch.channels_last, 1),
    "pos-tokens-vit-s": ((197, 384), None, -1),
    "pos-tokens-vit-b": ((197, 768), None, -1),
}


def _cases():
    if SMOKE:
        return [("pos-nchw-layer3", 8, 4, torch.float32, "clamp"),
                ("pos-tokens-vit-s", 4, 1, torch.bfloat16, "project")]
    batches = [1, 32, 256] if (DEVICE == "cuda" or FULL) else [1, 64]
    if os.environ.get("FIRE_BENCH_BATCHES"):
        batches = [int(b) for b in os.environ["FIRE_BENCH_BATCHES"].split(",")]
    return [(s, n, k, dt, "clamp") for s in SHAPES for n in batches for k in (1, 4)
            for dt in (torch.float32, torch.bfloat16)]


CASES = _cases()
# fire-compiled: our op called from a compiled function (conftest.compiled_call), at batch 1
IMPLS = ["fire", "fire-compiled", "eager", "compile", "copy"] + (["fire-cuda-native"] if DEVICE == "cuda" else [])


def _inputs(name, n, k, dtype, mode):
    shape, fmt, cd = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=g).to(DEVICE, dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = x.shape[cd]
    V = torch.linalg.qr(torch.randn(C, k, generator=g))[0].T.contiguous().to(DEVICE)
    a = torch.rand(k, generator=g).to(DEVICE)
    mu = (0.1 * torch.randn(C, generator=g)).to(DEVICE)
    tau = torch.rand(k, generator=g).to(DEVICE) if mode == "clamp" else None
    return x, V, a, mu, tau, cd


def _eager(x, V, a, mu, tau, mode, cd):
    return fr.repair_reference(x, V, a, mu, tau, mode, channel_dim=cd, compute_dtype=torch.float32)[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1]}-K{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_op_per_position(benchmark, case, impl, use_backend):
    name, n, k, dtype, mode = case
    x, V, a, mu, tau, cd = _inputs(name, n, k, dtype, mode)
    if impl in ("fire", "fire-cuda-native"):
        if impl == "fire-cuda-native":
            use_backend("cuda")
        fn = lambda: torch.ops.fire.repair(x, V, a, mu, tau, mode, cd)  # noqa: E731
    elif impl == "fire-compiled":
        fn = compiled_call(n, (x, V, a, mu, tau, mode, cd))
    elif impl == "eager":
        fn = lambda: _eager(x, V, a, mu, tau, mode, cd)  # noqa: E731
    elif impl == "compile":
        compiled = torch.compile(_eager, dynamic=False)
        fn = lambda: compiled(x, V, a, mu, tau, mode, cd)  # noqa: E731
    else:
        fn = lambda: x.clone()  # noqa: E731
    benchmark.group = f"op {name} N={n} K={k} {dtype} {mode}"
    run_timed(benchmark, fn, bytes_moved=2 * x.numel() * x.element_size(),
              extra={"impl": impl, "case": name, "shape": list(x.shape[1:]), "N": n, "K": k, "dtype": str(dtype),
                     "mode": mode, "channel_dim": cd, "backend": os.environ.get("FIRE_BACKEND", "auto")})
