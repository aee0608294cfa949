"""Test setup. Without a GPU, the Triton kernels run under the Triton interpreter, which must
be switched on before triton is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fire_kernels  # noqa: E402
from fire_repair import _ext  # noqa: E402


def _cuda_native_available() -> bool:
    if not (torch.cuda.is_available() and _ext.AVAILABLE):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fire::_repair_native", "CUDA")


def available_backends():
    """(name, device, FIRE_BACKEND value) for each backend that can run here."""
    out = [("cpu-native", "cpu", "cpu")]
    if fire_kernels.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("cpu-triton-interpreted", "cpu", "triton"))
    if torch.cuda.is_available():
        if fire_kernels.HAVE_TRITON:
            out.append(("cuda-triton", "cuda", "triton"))
        if _cuda_native_available():
            out.append(("cuda-native", "cuda", "cuda"))
    return out


BACKENDS = available_backends()


def _set_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture
def use_backend():
    """use_backend(value): FIRE_BACKEND set to value (None: unset) and applied
    (fire_repair.ops.set_backend: the op's one backend decision) for this test; both are as they
    were after it."""
    from fire_repair.ops import set_backend

    saved = os.environ.get("FIRE_BACKEND")

    def use(value):
        _set_env("FIRE_BACKEND", value)
        set_backend()

    yield use
    _set_env("FIRE_BACKEND", saved)
    set_backend()


@pytest.fixture(params=BACKENDS, ids=[b[0] for b in BACKENDS])
def backend(request, use_backend):
    name, device, env = request.param
    use_backend(env)
    return device


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of a few seconds or more")


def pytest_report_header(config):
    return "fire backends here: " + ", ".join(b[0] for b in BACKENDS)


def _backdoored(name):
    from fire_eval.scenario import backdoored_digits

    return backdoored_digits(name, seed=0)


@pytest.fixture(scope="session")
def backdoored():
    """A small CNN trained on the embedded digits with a BadNets trigger (about 5 s on 2 cores).

    Returns a dict: model, attack, clean/poisoned held-out and evaluation splits."""
    return _backdoored("badnets")


@pytest.fixture(scope="session")
def backdoored_moving():
    """As `backdoored`, with the BadNets patch at a random position per image."""
    return _backdoored("moving")
