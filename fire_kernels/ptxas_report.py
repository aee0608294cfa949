"""Compiling the Triton kernels for real GPU targets on a machine without a GPU: PTX and cubin
from `triton.compile`, then registers and spills from the `ptxas -v` that ships with Triton.
Used by tests/kernels/test_kernels_compile.py (fails on any spill) and benchmarks/kernel_resources.py
(the per-configuration table in benchmarks/README.md)."""
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from . import repair
from .blocks import MAX_K, fused_blocks, fused_max_d, next_pow2, row_block_blocks

PTR_ARGS = ("x_ptr", "out_ptr", "v_ptr", "alpha_ptr", "center_ptr", "tau_ptr", "scores_ptr", "partial_ptr",
            "slope_ptr")
INT64_ARGS = ("sxb", "sxp", "sxd", "sob", "sop", "sod")


@dataclass
class Resources:
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


def configurations(block_ks=None):
    """(kernel name, constexprs, num_warps) for every block configuration blocks.py can choose,
    at the heaviest flags of each kind of call (clamp with centre, tau and scores; invert with
    its slope too: the most live values) and each BLOCK_K in `block_ks` (default 1, 4, 16 and
    MAX_K)."""
    block_ks = block_ks or sorted({1, 4, 16, next_pow2(MAX_K)})
    for mode, rescale in ((2, False), (4, True)):
        flags = dict(MODE=mode, HAS_TAU=True, HAS_SLOPE=rescale, HAS_CENTER=True, NEED_C=True, WANT_SCORES=True)
        seen = set()
        d = 16
        while d <= fused_max_d(rescale):
            block_n, block_d, warps = fused_blocks(d, rescale)
            if (block_n, block_d, warps) not in seen:
                seen.add((block_n, block_d, warps))
                for bk in block_ks:
                    yield "_repair_fused_kernel", dict(flags, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=bk), warps
            d *= 2
        long_rows = sorted({row_block_blocks(fused_max_d(rescale) + 1, k, rescale=rescale) for k in block_ks})
        for block_n, block_d, block_k, span, _, warps in long_rows:
            blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, SPAN=span)
            if not rescale:  # the scores kernel has no mode
                yield "_block_scores_kernel", dict(HAS_CENTER=True, **blocks), warps
            yield "_block_apply_kernel", dict(flags, **blocks), warps


def _ptxas():
    """Triton's newest bundled ptxas (the PTX it emits may be newer than the older one reads)."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {folder}")


def compile_kernel(name: str, constexprs: dict, num_warps: int, arch: int) -> Resources:
    """Compiles one kernel for sm_<arch> (fp32 tensors) and reads `ptxas -v`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(repair, name)
    params = fn.arg_names
    sig = {p: "constexpr" if p in constexprs else "*fp32" if p in PTR_ARGS else "i64" if p in INT64_ARGS else "i32"
           for p in params}
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)  # sm_90a for Hopper
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", target, path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout

    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return Resources(kernel=name, arch=arch, config={**constexprs, "num_warps": num_warps},
                     registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                     spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"))


def scan(archs=(80, 90)) -> list:
    """Resources of every configuration for each arch, as dicts. Needs the real (not
    interpreted) kernels: run it in a process without TRITON_INTERPRET=1."""
    from dataclasses import asdict

    return [asdict(compile_kernel(name, c, warps, arch)) for name, c, warps in configurations() for arch in archs]


if __name__ == "__main__":  # python -m fire_kernels.ptxas_report: the scan as JSON
    import json
    import warnings

    warnings.simplefilter("ignore")
    print(json.dumps(scan()))
