"""What CPU calls compile to under torch.compile and export: the C++ kernel, or the plain maths
(`repair_rows_reference`), which Inductor compiles and fuses with its neighbours.

Under torch.compile on the CPU, a call of the C++ kernel from Inductor's Python wrapper costs
about 5-10 us more than Inductor's own C++ for the same maths on a small input (which can also
fuse with its neighbours). So calls whose elements x directions are at most COMPILE_INLINE_WORK
compile to the plain maths; larger ones keep the fused kernel (up to 4x faster than Inductor's
code there). Measured on a 2-core Zen 3, side by side (benchmarks/README.md, "Under
torch.compile"): inline wins by up to 14% at 512 x K 1-16, ties at 16384 x K 1, and loses from
2048 x K 16 on. The choice is made at trace time, from static sizes; a symbolic size keeps the
kernel. Inside `plain_maths()` every traced CPU call becomes plain maths, whatever its size, so
that an exported package needs no C++ extension of ours where it is loaded (fire_repair.export).
"""
import contextlib
import contextvars

import torch
from torch import Tensor

from fire_kernels.modes import MODES

from ..reference import repair_rows_reference

COMPILE_INLINE_WORK = 16384
_plain_maths = contextvars.ContextVar("fire_plain_maths", default=False)


@contextlib.contextmanager
def plain_maths():
    """Inside the block, CPU calls become plain PyTorch maths instead of calls of the C++ kernel,
    so that what torch.export and AOTInductor trace is maths Inductor compiles and fuses itself."""
    token = _plain_maths.set(True)
    try:
        yield
    finally:
        _plain_maths.reset(token)


def inline_under_compile(x3: Tensor, K: int) -> bool:
    """Whether this call of the C++ kernel, traced by torch.compile (or export), becomes plain maths."""
    if x3.device.type != "cpu":
        return False
    if _plain_maths.get():  # Inductor traces a triton_op's body outside is_compiling()
        return True
    if not torch.compiler.is_compiling():
        return False
    n = x3.numel()
    return isinstance(n, int) and n * K <= COMPILE_INLINE_WORK


def inline_rows(x3, V, alpha, center, tau, mode_id: int, want_scores: bool, slope=None):
    """The kernel's contract in plain PyTorch (fp32 maths, out in x3's dtype and layout)."""
    D = x3.shape[-1]
    out, c = repair_rows_reference(x3.reshape(-1, D).float(), V, alpha, center, tau, MODES[mode_id], slope)
    out3 = torch.empty_like(x3)
    out3.copy_(out.reshape(x3.shape))
    return out3, (c if want_scores else c.new_empty(0))
