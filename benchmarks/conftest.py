"""Benchmark setup: device, grid size (FIRE_BENCH_SMOKE=1: a tiny grid that CI runs so the
suite never rots; FIRE_BENCH_FULL=1: the whole matrix), and a timer that is correct on GPUs."""
import os
import platform
import time

import pytest
import torch

import fire_repair.ops  # registers the ops

SMOKE = os.environ.get("FIRE_BENCH_SMOKE") == "1"
FULL = os.environ.get("FIRE_BENCH_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name): FIRE_BACKEND for this test, applied (fire_repair.ops.set_backend); the
    environment and the backend as they were after it."""
    yield lambda name: (monkeypatch.setenv("FIRE_BACKEND", name), fire_repair.ops.set_backend())
    monkeypatch.undo()
    fire_repair.ops.set_backend()


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_timed(benchmark, fn, *, bytes_moved=None, extra=None):
    """Times fn with pytest-benchmark; on CUDA each round is synchronised and the device-side
    time from triton.testing.do_bench (CUDA events, warm-up, L2 flush) is recorded too."""
    info = {"device": device_name(), "torch": torch.__version__, **(extra or {})}
    if DEVICE == "cuda":
        from triton.testing import do_bench

        def synced():
            fn()
            torch.cuda.synchronize()

        fn()
        torch.cuda.synchronize()
        info["do_bench_ms"] = do_bench(fn, warmup=25, rep=100)
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
        seconds = info["do_bench_ms"] / 1e3
    else:
        fn()  # warm-up (first-call allocations)
        benchmark(fn)
        if benchmark.stats is not None:
            seconds = benchmark.stats.stats.median
        else:  # --benchmark-disable (the CI smoke run): one call, timed by hand
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
    if bytes_moved:
        info["bytes"] = bytes_moved
        info["GBps"] = bytes_moved / seconds / 1e9
    benchmark.extra_info.update(info)
    return seconds


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Every case compiles from scratch. Dynamo keys its cache on the code object, which all
    cases of a test share: past 8 compiles (torch._dynamo.config.recompile_limit) torch.compile
    quietly runs the function eagerly (fullgraph=True fails instead), so before this reset every
    "compile" time after a test's eighth case was eager PyTorch's."""
    torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True, scope="session")
def _no_compile_artifact_caches():
    """Compile from source in every run: Inductor's FX-graph and AOTAutograd caches key a graph on
    Dynamo's view of it, where our op is one node; its body (which AOTAutograd traces, e.g. the
    plain maths small calls compile to) is not in the key, so a cache warmed by an older build
    would be timed instead of this one."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def compiled_call(n, op_args):
    """Our op called from a torch.compile'd function (what a compiled model runs), on `op_args`:
    the `fire-compiled` rows, timed at batch 1 only, where the per-call overhead shows (each case
    costs a compile); the smoke run compiles its cases too, so CI keeps the path alive."""
    if n != 1 and not SMOKE:
        pytest.skip("our op under torch.compile is timed at batch 1")
    # The same options as the `compile` rows' torch.compile of the reference maths: fullgraph=True
    # alone costs about 5 us per call in torch 2.13 (a config patch around every call; 64.1
    # against 58.6 us for the compiled reference at 512 features, K = 4), which the v0.4 run
    # charged to our op. That the op compiles with no graph break is tests/op/test_op_compile.py's.
    ours = torch.compile(_op_call, dynamic=False)
    return lambda: ours(*op_args)


def _op_call(*args):
    return torch.ops.fire.repair(*args)
