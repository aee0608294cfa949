"""Builds fire_repair._C: the C++ CPU kernel always, the CUDA C++ fallback where CUDA is really there.

Install with `pip install --no-build-isolation .` next to an installed torch (an isolated build
environment would download another torch).
"""
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _cpu_flags():
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds, and is serial without it. The
    # runtime (libgomp.so.1) resolves to the one torch has already loaded.
    flags = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=fast"]
    # The extension is built on the machine that runs it; FIRE_PORTABLE=1 gives a generic build.
    if os.environ.get("FIRE_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        if " avx2" in info and " fma" in info:
            flags += ["-mavx2", "-mfma"]
    return flags


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = ["csrc/repair_cpu.cpp", "csrc/repair_op.cpp"]
    extra = {"cxx": _cpu_flags()}
    if _want_cuda():
        sources.append("csrc/cuda/repair_cuda.cu")
        extra["cxx"].append("-DFIRE_WITH_CUDA")  # repair_op.cpp registers the op's CUDA keys too
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        return CUDAExtension("fire_repair._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                             py_limited_api=True)
    return CppExtension("fire_repair._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                        py_limited_api=True)


setup(
    name="fire-kernels",
    version="0.3.0",
    description="Fused kernels for FIRE: inference-time repair of backdoored networks",
    package_dir={"": "python", "fire_kernels": "fire_kernels"},
    packages=["fire_repair", "fire_repair._op", "fire_eval", "fire_kernels"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "cli": ["pillow"],  # fire-repair fit / export read image folders
        "eval": ["scikit-learn", "matplotlib", "pillow"],
        "hf": ["transformers"],  # only the tests of Hugging Face models; the library never imports it
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "matplotlib", "pillow", "ruff"],
    },
    entry_points={"console_scripts": ["fire-repair=fire_repair.cli:main", "fire-eval=fire_eval.cli:main"]},
)
