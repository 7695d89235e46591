"""`l1_prune`: medical-aware token pruning (Python face, fake kernels, autograd).

Consecutive CT/MRI slices and video frames repeat themselves. A patch (or a unit of k x k
patches) whose mean absolute difference to the same place one frame earlier is below a
threshold is dropped before the vision encoder, which saves encoder and LLM compute. Kept
tokens keep their true (t, h, w) positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._library import library_loaded, require_library

MODES = ("previous", "last_kept")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


class PruneResult(NamedTuple):
    """What `l1_prune` returns.

    keep: `[F, N]` bool mask of kept patches.
    index: `[K]` int64 flat indices into `F * N` of the kept patches, in original order.
    positions: `[K, 3]` int32 `(t, h, w)`: t is the frame's index inside its item,
        h = n // grid_w, w = n % grid_w.
    cu_seqlens: `[B + 1]` int32 offsets of each item's kept tokens.
    values: `[K, P]` the kept patches' values.
    """

    keep: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    values: torch.Tensor


class PaddedPruneResult(NamedTuple):
    """What `l1_prune_padded` returns: `PruneResult`'s fields sized to the upper bound
    `F * N` (rows past `count` hold index -1, positions -1 and values 0), plus `count`, a
    0-d int64 tensor on the input's device with the true number of kept patches."""

    keep: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor


def check_l1_prune_args(
    patches: torch.Tensor,
    cu_frames: torch.Tensor,
    grid: Sequence[int],
    threshold: float,
    mode: str,
    unit: int,
    min_keep_per_frame: int,
) -> tuple[int, int]:
    """Validate l1_prune's arguments without reading tensor values (no GPU sync); the
    compiled kernels apply the same rules. Returns the grid as (grid_h, grid_w)."""
    if patches.dim() != 3:
        raise ValueError(
            "l1_prune: patches must be [F, N, P] (frames, patches per frame, values per patch), "
            f"got shape {tuple(patches.shape)}"
        )
    if patches.dtype not in _DTYPES:
        raise TypeError(
            f"l1_prune: patches must be float32, float16, bfloat16 or uint8, got {patches.dtype}"
        )
    if patches.shape[2] < 1:
        raise ValueError("l1_prune: patches have no values (P = 0)")
    if cu_frames.dim() != 1 or cu_frames.shape[0] < 2:
        raise ValueError(
            f"l1_prune: cu_frames must be 1-D with B+1 >= 2 offsets, got shape {tuple(cu_frames.shape)}"
        )
    if cu_frames.dtype != torch.int32:
        raise TypeError(f"l1_prune: cu_frames must be int32, got {cu_frames.dtype}")
    if cu_frames.device != patches.device:
        raise ValueError(
            f"l1_prune: cu_frames are on {cu_frames.device} but patches are on {patches.device}"
        )
    if len(grid) != 2:
        raise ValueError(f"l1_prune: grid must be (grid_h, grid_w), got {tuple(grid)}")
    grid_h, grid_w = (int(v) for v in grid)
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"l1_prune: grid must be positive, got ({grid_h}, {grid_w})")
    if grid_h * grid_w != patches.shape[1]:
        raise ValueError(
            f"l1_prune: grid ({grid_h}, {grid_w}) has {grid_h * grid_w} patches but "
            f"patches.size(1) = N = {patches.shape[1]}"
        )
    if unit < 1:
        raise ValueError(f"l1_prune: unit must be >= 1, got {unit}")
    if grid_h % unit or grid_w % unit:
        raise ValueError(f"l1_prune: grid ({grid_h}, {grid_w}) is not divisible by unit = {unit}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"l1_prune: threshold must be finite and >= 0, got {threshold}")
    if patches.dtype == torch.uint8 and threshold > 255:
        raise ValueError(
            f"l1_prune: for uint8 patches the threshold is in 0..255 units, got {threshold}"
        )
    if mode not in MODES:
        raise ValueError(f"l1_prune: mode must be 'previous' or 'last_kept', got '{mode}'")
    units = (grid_h // unit) * (grid_w // unit)
    if not 0 <= min_keep_per_frame <= units:
        raise ValueError(
            f"l1_prune: min_keep_per_frame must be in [0, {units}] (units per frame), "
            f"got {min_keep_per_frame}"
        )
    return grid_h, grid_w


def _prepare(patches, cu_frames, grid, threshold, mode, unit, min_keep_per_frame, op):
    threshold, unit, min_keep_per_frame = float(threshold), int(unit), int(min_keep_per_frame)
    grid_h, grid_w = check_l1_prune_args(
        patches, cu_frames, grid, threshold, mode, unit, min_keep_per_frame
    )
    require_library(op, patches.device)
    return (patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep_per_frame)


def l1_prune(
    patches: torch.Tensor,
    cu_frames: torch.Tensor,
    grid: Sequence[int],
    threshold: float = 0.1,
    mode: str = "previous",
    unit: int = 1,
    min_keep_per_frame: int = 0,
) -> PruneResult:
    """Drop patches that barely changed since the previous slice/frame of the same item.

    Args:
        patches: `[F, N, P]` float32/float16/bfloat16 (the normalized pixel values the
            encoder sees) or uint8 (raw 8-bit pixels: the distance is then exact integer
            arithmetic and `threshold` is in 0..255 units).
        cu_frames: int32 `[B + 1]` frame offsets of the items (a 2D image is an item of
            one frame); starts at 0, strictly increasing, ends at F.
        grid: `(grid_h, grid_w)` with `grid_h * grid_w == N` (patch n sits at row
            n // grid_w, column n % grid_w).
        threshold: keep a unit iff its mean |difference| >= threshold (0.1 in OmniV-Med).
        mode: "previous" compares with the previous frame. "last_kept" compares with the
            last kept version of the same unit: a slow drift then accumulates until it
            crosses the threshold instead of hiding forever below it, at the cost of
            frames that must be processed in order (less parallel).
        unit: prune `unit x unit` blocks of patches together (for encoders that merge 2x2
            patches later); the grid must be divisible by it.
        min_keep_per_frame: keep at least this many units in every frame, the largest
            differences first (ties: lower unit index).

    The first frame of every item is kept whole. The result's fields are described in
    `PruneResult`. On a GPU this reads the true count back once (one synchronisation);
    `l1_prune_padded` avoids it.
    """
    args = _prepare(patches, cu_frames, grid, threshold, mode, unit, min_keep_per_frame, "l1_prune")
    return PruneResult(*torch.ops.omnivmed.l1_prune.default(*args))


def l1_prune_padded(
    patches: torch.Tensor,
    cu_frames: torch.Tensor,
    grid: Sequence[int],
    threshold: float = 0.1,
    mode: str = "previous",
    unit: int = 1,
    min_keep_per_frame: int = 0,
) -> PaddedPruneResult:
    """`l1_prune` without host synchronisation: every output is sized to the upper bound
    `F * N` and the true count comes back as a 0-d device tensor (the way
    `torch.nonzero_static` works). On CUDA: two kernel launches, usable inside a CUDA
    graph. `cu_frames` values are trusted (not read on the host); out-of-range values
    cannot make the kernels access memory out of bounds but give meaningless results."""
    args = _prepare(
        patches, cu_frames, grid, threshold, mode, unit, min_keep_per_frame, "l1_prune_padded"
    )
    return PaddedPruneResult(*torch.ops.omnivmed.l1_prune_padded.default(*args))


def _fake_outputs(patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep, rows):
    check_l1_prune_args(patches, cu_frames, (grid_h, grid_w), threshold, mode, unit, min_keep)
    frames, patches_per_frame, values = patches.shape
    return (
        patches.new_empty((frames, patches_per_frame), dtype=torch.bool),
        patches.new_empty((rows,), dtype=torch.int64),
        patches.new_empty((rows, 3), dtype=torch.int32),
        cu_frames.new_empty(cu_frames.shape),
        patches.new_empty((rows, values)),
    )


def _l1_prune_fake(
    patches, cu_frames, grid_h, grid_w, threshold=0.1, mode="previous", unit=1, min_keep_per_frame=0
):
    kept = torch.library.get_ctx().new_dynamic_size()  # how many survive depends on the data
    return _fake_outputs(
        patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep_per_frame, kept
    )


def _l1_prune_padded_fake(
    patches, cu_frames, grid_h, grid_w, threshold=0.1, mode="previous", unit=1, min_keep_per_frame=0
):
    rows = patches.shape[0] * patches.shape[1]
    outs = _fake_outputs(
        patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep_per_frame, rows
    )
    return (*outs, patches.new_empty((), dtype=torch.int64))


def _setup_context(ctx, inputs, output) -> None:
    patches = inputs[0]
    ctx.save_for_backward(output[1])  # index
    ctx.patches_shape = patches.shape


def _backward(ctx, *grads):
    # Only `values` (output 4) is differentiable: a gather, so its backward is a scatter-add.
    (index,) = ctx.saved_tensors
    grad_values = grads[4]
    frames, patches_per_frame, values = ctx.patches_shape
    grad = grad_values.new_zeros((frames * patches_per_frame, values))
    valid = index >= 0  # padding rows of l1_prune_padded carry index -1
    grad.index_add_(0, index.clamp(min=0), grad_values * valid.unsqueeze(1).to(grad_values.dtype))
    return grad.view(frames, patches_per_frame, values), None, None, None, None, None, None, None


if library_loaded():
    torch.library.register_fake("omnivmed::l1_prune")(_l1_prune_fake)
    torch.library.register_fake("omnivmed::l1_prune_padded")(_l1_prune_padded_fake)
    for _name in ("omnivmed::l1_prune", "omnivmed::l1_prune_padded"):
        torch.library.register_autograd(_name, _backward, setup_context=_setup_context)
