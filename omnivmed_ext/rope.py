"""`rope_nd`: the multi-axis rotary embedding op (Python face, fake kernel, autograd)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._library import library_loaded, require_library

MAX_HEAD_DIM = 256
MAX_AXES = 4
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_rope_nd_args(
    x: torch.Tensor, positions: torch.Tensor, sections: Sequence[int], theta: float
) -> None:
    """Validate rope_nd's arguments; the compiled kernels apply the same rules."""
    if x.dim() != 3:
        raise ValueError(f"rope_nd: x must be [L, H, D], got a tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rope_nd: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    head_dim = x.shape[2]
    if not (head_dim > 0 and head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM):
        raise ValueError(
            f"rope_nd: head dim D = x.size(2) must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}"
        )
    sections = list(sections)
    if not 1 <= len(sections) <= MAX_AXES:
        raise ValueError(
            f"rope_nd: sections must list 1 to {MAX_AXES} axes, got {len(sections)} ({sections})"
        )
    if any(int(s) < 0 for s in sections):
        raise ValueError(f"rope_nd: sections must be non-negative, got {sections}")
    if sum(sections) != head_dim // 2:
        raise ValueError(
            f"rope_nd: sections {sections} sum to {sum(sections)} but must sum to "
            f"D/2 = {head_dim // 2} (D = {head_dim})"
        )
    if not 0.0 < theta < math.inf:  # also false for NaN
        raise ValueError(f"rope_nd: theta must be a positive finite number, got {theta}")
    if (
        positions.dim() != 2
        or positions.shape[0] != x.shape[0]
        or positions.shape[1] != len(sections)
    ):
        raise ValueError(
            f"rope_nd: positions must be [L, A] = [{x.shape[0]}, {len(sections)}] (one row per "
            f"token, one column per section), got {list(positions.shape)}"
        )
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rope_nd: positions must be int32 or int64, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(
            f"rope_nd: positions are on {positions.device} but x is on {x.device}; "
            "both must be on the same device"
        )


def rope_nd(
    x: torch.Tensor,
    positions: torch.Tensor,
    sections: Sequence[int],
    theta: float = 10000.0,
    inverse: bool = False,
) -> torch.Tensor:
    """Rotate `x` `[L, H, D]` by multi-axis rotary position embedding.

    Channel p pairs with p + D/2 ("rotate_half" layout). Axis a owns `sections[a]`
    consecutive pairs of the first half; pair j of axis a turns by
    ``positions[:, a] * theta ** (-j / sections[a])``. Math in fp32 (fp64 for float64
    inputs), result in x's dtype, always contiguous. ``inverse=True`` turns by the negative
    angle, which is also the backward. Differentiable in `x`.

    Args:
        x: `[L, H, D]`, float32/float16/bfloat16/float64, any strides; D even, at most 256.
        positions: `[L, A]` int32 or int64, one column per axis (e.g. t, h, w).
        sections: A non-negative ints summing to D/2 (1 to 4 axes).
        theta: rotary base.
        inverse: rotate by the negative angle.
    """
    sections = [int(s) for s in sections]
    theta = float(theta)
    check_rope_nd_args(x, positions, sections, theta)
    require_library("rope_nd", x.device)
    return torch.ops.omnivmed.rope_nd.default(x, positions, sections, theta, bool(inverse))


def _rope_nd_fake(
    x: torch.Tensor,
    positions: torch.Tensor,
    sections: Sequence[int],
    theta: float = 10000.0,
    inverse: bool = False,
) -> torch.Tensor:
    check_rope_nd_args(x, positions, sections, theta)
    return x.new_empty(x.shape)


def _rope_nd_setup_context(ctx, inputs, output) -> None:
    _, positions, sections, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.sections = list(sections)
    ctx.theta = theta
    ctx.inverse = inverse


def _rope_nd_backward(ctx, grad: torch.Tensor):
    (positions,) = ctx.saved_tensors
    # A rotation's transpose is the rotation by the negative angle.
    grad_x = torch.ops.omnivmed.rope_nd.default(
        grad, positions, ctx.sections, ctx.theta, not ctx.inverse
    )
    return grad_x, None, None, None, None


if library_loaded():
    torch.library.register_fake("omnivmed::rope_nd")(_rope_nd_fake)
    torch.library.register_autograd(
        "omnivmed::rope_nd", _rope_nd_backward, setup_context=_rope_nd_setup_context
    )
