"""Shipping a repaired model: an AOTInductor package that runs without this library.

`export(model, example, path)` exports the model as it is (with its repairs attached) through
`torch.export` with a dynamic batch dimension, and compiles it with AOTInductor into one `.pt2`
file. The serving process loads it with `torch._inductor.aoti_load_package(path)`; it needs
torch, not `fire_repair`. To change a repair without exporting again, ship the model and the
profile file instead and `attach` at start-up.
"""
from pathlib import Path
from typing import Union

import torch

from fire_kernels import HAVE_TRITON

from .attachment import repair_modules
from .inference import eval_mode
from .ops import plain_maths
from .smoothing import Smoothed


def export(model: torch.nn.Module, example: torch.Tensor, path: Union[str, Path], max_batch: int = 4096,
           require_repair: bool = True) -> Path:
    """Writes the model (eval mode, repairs attached) as an AOTInductor package at `path` and
    returns the path. `example` is one input batch; the batch size is dynamic from 1 to
    `max_batch`, every other dimension fixed at the example's. Raises ValueError if no repair is
    attached (unless `require_repair=False`) and RuntimeError naming the step that failed."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package is a .pt2 file, got {str(path)!r}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("example must be a tensor holding a batch of at least one input")
    if require_repair and not repair_modules(model):
        raise ValueError("no repair is attached to the model (fire_repair.attach first, or require_repair=False)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a batch of 2 at least, so that export does not specialise the batch dimension to the example's 1
    sample = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    if not HAVE_TRITON:  # without it the op is opaque to Inductor, and the package would call our extension
        raise RuntimeError("fire_repair.export needs Triton installed (pip install 'fire-kernels[triton]'): it lets "
                           "AOTInductor compile the repair into the package instead of calling fire_repair's extension")
    # CPU repairs become maths Inductor compiles, not calls of our extension (which the serving
    # process does not have)
    hooks = [m._smoothing for m in repair_modules(model).values() if m._smoothing is not None]
    traced = Smoothed(model, hooks[0]) if hooks else model  # the smoothing as one forward, not a hook
    with eval_mode(model), torch.no_grad(), plain_maths():
        try:
            program = torch.export.export(traced, (sample,), dynamic_shapes=({0: batch},))
        except Exception as err:  # torch's own message says what in the model it cannot trace
            raise RuntimeError(f"torch.export could not export the model: {err}") from err
        try:
            return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))
        except Exception as err:
            raise RuntimeError(f"AOTInductor could not compile the exported model: {err}") from err
