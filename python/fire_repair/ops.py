"""`torch.ops.fire.repair` and `torch.ops.fire.repair_with_scores`: the ops' definition and the
public surface (`repair`, `repair_with_scores`, `backend_for`, `set_backend`, `plain_maths`).

The public ops are `torch.library.triton_op`s: their body (`_op.body.run`, after
`_op.validate.validate`) is plain PyTorch plus kernel calls, so it doubles as the fake
implementation and `torch.compile` traces straight through it. The body sends
- CUDA tensors to the Triton kernels in `fire_kernels` (or to the CUDA C++ fallback when Triton
  is missing or FIRE_BACKEND=cuda);
- CPU tensors to the C++ kernel (`torch.ops.fire._repair_native`, which has its own fake), or to
  the Triton kernels under TRITON_INTERPRET=1 with FIRE_BACKEND=triton (how CI runs them).
That choice is made once, in `_op.backend` (at import and on `set_backend`), and the C++ op
(csrc/repair_op.cpp), which takes eager calls at the CPU and AutogradCPU keys without Python,
consults the same decision.

Two row forms, chosen by `channel_dim` (`_op.layout`): None (flattened), one row per sample in
x's physical order (a channels_last input is never copied; the directions and centre are
permuted instead); an int (per position), the channels at each position form a row, the same
(K, C) directions at every position, scores (N, *positions, K). Mode invert (gated, then each
flagged row rescaled about the centre by the per-direction `slope`, see fire_kernels.modes) is
the one mode with a seventh argument, `slope` (K,); without it, invert is gated. Either way
`out` comes back in x's memory format.

Values. The op checks types, devices and shapes on every call and never reads a value on the
host (that would cost a device sync per call and could only be cached by tensor version, which
`.data`, numpy and storage writes do not bump: the stale-result bug of earlier releases). So
nothing is cached, and the arithmetic is plain IEEE fp32, the same on every backend, memory
layout and compile state, and in the reference (`fire_repair.repair_reference`, which defines it): NaN or
inf in directions/center/alpha reach the output as they would in `x - w @ V` summed over
*every* direction, so a direction whose weight is 0 still contributes 0 * inf = NaN where it
holds an inf or NaN (the C++ kernel skips a zero weight only where its score proves the
direction finite, which is exact); in invert, the share u = h / (1 + h), h = sum_k w_k slope_k
is likewise summed over every direction (0 * a NaN slope makes the row NaN, flagged or not),
and only a share of exactly 0 leaves the row as t = x - w @ V. A NaN in x makes its row's
scores NaN and, in project and clamp, the whole repaired row NaN (shift subtracts a constant,
so only the NaN elements stay NaN); an infinite
score gives the infinities and NaNs of that arithmetic (clamp leaves a row whose score is -inf
unrepaired). Finite inputs whose centred values x - mu or scores overflow fp32 (|.| > 3.4e38)
give inf like any fp32 computation; scores are computed centred (<v, x - mu>), so a large
common offset in x and mu costs no precision. The tensors' owners validate values where they
are set: `RepairModule` (at attach, `load_layer`, `load_state_dict`), `Profile.load`,
`LayerProfile`; `fire_repair.check_repairs(model)` re-checks an attached model on demand.
"""
from typing import Optional

import torch
from torch import Tensor

import fire_kernels
from fire_kernels import HAVE_TRITON

from . import _ext
from ._op import backward as _backward
from ._op.backend import BACKENDS, backend_for, set_backend  # noqa: F401  (public)
from ._op.body import run as _run
from ._op.inline import COMPILE_INLINE_WORK, plain_maths  # noqa: F401  (public)
from ._op.validate import FLOAT_DTYPES, MODE_IDS, channel_dim_of  # noqa: F401  (public)
from ._op.validate import validate as _validate


def _define(name: str):
    """A triton_op where Triton exists; otherwise a custom_op whose fake is the same body."""

    def deco(fn):
        if HAVE_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return deco


def _repair(
    x: Tensor,
    directions: Tensor,
    alpha: Tensor,
    center: Optional[Tensor] = None,
    tau: Optional[Tensor] = None,
    mode: str = "project",
    channel_dim: Optional[int] = None,
    slope: Optional[Tensor] = None,
) -> Tensor:
    mode_id, a, t, cd, g = _validate(x, directions, alpha, center, tau, mode, channel_dim, slope)
    return _run(x, directions, a, center, t, mode_id, False, cd, g)[0]


def _repair_with_scores(
    x: Tensor,
    directions: Tensor,
    alpha: Tensor,
    center: Optional[Tensor] = None,
    tau: Optional[Tensor] = None,
    mode: str = "project",
    channel_dim: Optional[int] = None,
    slope: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    mode_id, a, t, cd, g = _validate(x, directions, alpha, center, tau, mode, channel_dim, slope)
    out, scores = _run(x, directions, a, center, t, mode_id, True, cd, g)
    return out, scores


repair = _define("fire::repair")(_repair)
repair_with_scores = _define("fire::repair_with_scores")(_repair_with_scores)
# Twins under private names: where the C++ extension is loaded, eager CPU calls of the two ops
# run in C++ (csrc/repair_op.cpp) and defer to these for what the C++ path does not take
# (gradients, FIRE_BACKEND=triton, inputs to copy or to refuse with a named error).
_repair_py = _define("fire::_repair_py")(_repair)
_repair_with_scores_py = _define("fire::_repair_with_scores_py")(_repair_with_scores)


@_define("fire::_repair_grad")
def _repair_grad(
    grad: Tensor, directions: Tensor, weights: Tensor, channel_dim: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """grad - sum_k weights[r, k] <grad_r, v_k> v_k, and <grad_r, v_k>, per row r, in one pass
    (backward). Rows as in the forward op: per sample, or per sample and position."""
    cd = channel_dim_of(grad, channel_dim)
    out, p = _run(grad, directions, weights, None, None, fire_kernels.PROJECT, True, cd)
    return out, p


if _ext.AVAILABLE:

    @torch.library.register_fake("fire::_repair_native")
    def _repair_native_fake(x, directions, alpha, center, tau, mode, want_scores, slope=None):
        rows, K = x.shape[0] * x.shape[1], directions.shape[0]
        out = torch.empty_like(x)
        scores = x.new_empty((rows, K) if want_scores else (0,), dtype=torch.float32)
        return out, scores


for _op in (repair, repair_with_scores, _repair_py, _repair_with_scores_py):
    _op.register_autograd(_backward.backward, setup_context=_backward.setup)
_repair_grad.register_autograd(_backward.grad_backward, setup_context=_backward.grad_setup)

# The backend decision, from FIRE_BACKEND as the environment holds it now; told to the C++ op,
# which from here on serves the eager calls the decision gives the native kernels.
set_backend()
