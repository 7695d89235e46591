"""(t, h, w) position ids and `cu_seqlens` for packed variable-length visual tokens.

Every item (a 2D image, a volume's slices, a video's frames) contributes its tokens in
frame-major, then row-major order; items are concatenated and `cu_seqlens` (int32,
length B+1, starting at 0) marks where each one starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DeviceLike = torch.device | str | None


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def grid_positions(
    grid_h: int,
    grid_w: int,
    t: int = 0,
    *,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Positions `[grid_h * grid_w, 3]` of one frame's patch grid, row-major; a 2D image
    uses t = 0."""
    return frame_positions(1, grid_h, grid_w, t_offset=t, device=device, dtype=dtype)


def frame_positions(
    num_frames: int,
    grid_h: int,
    grid_w: int,
    *,
    t_offset: int = 0,
    t_stride: int = 1,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Positions `[F * grid_h * grid_w, 3]` of a stack of slices or frames: frame f gets
    t = t_offset + f * t_stride (a stride other than 1 keeps true slice/frame indices
    after subsampling)."""
    num_frames = _positive_int("num_frames", num_frames)
    grid_h = _positive_int("grid_h", grid_h)
    grid_w = _positive_int("grid_w", grid_w)
    t = torch.arange(num_frames, device=device, dtype=torch.int64) * int(t_stride) + int(t_offset)
    h = torch.arange(grid_h, device=device, dtype=torch.int64)
    w = torch.arange(grid_w, device=device, dtype=torch.int64)
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack((tt, hh, ww), dim=-1).reshape(-1, 3).to(dtype)


def cu_seqlens_from_lengths(
    lengths: Sequence[int] | torch.Tensor, *, device: DeviceLike = None
) -> torch.Tensor:
    """int32 `[B+1]` offsets (0, l0, l0+l1, ...) from per-item lengths."""
    lengths_t = torch.as_tensor(lengths, dtype=torch.int64, device=device).reshape(-1)
    if (lengths_t < 0).any():
        raise ValueError(f"item lengths must be non-negative, got {lengths_t.tolist()}")
    cu = torch.zeros(lengths_t.numel() + 1, dtype=torch.int64, device=lengths_t.device)
    torch.cumsum(lengths_t, 0, out=cu[1:])
    if cu[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"{int(cu[-1])} tokens in total do not fit int32 cu_seqlens")
    return cu.to(torch.int32)


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-item lengths from offsets."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, *, name: str = "cu_seqlens") -> None:
    """Raise unless `cu_seqlens` is int32 `[B+1]`, starts at 0, never decreases and ends at
    `total`. Reads the values, so it synchronises with the device."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D tensor of B+1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but there are {total} tokens")


@dataclass(frozen=True)
class ItemGrid:
    """The patch grid of one visual item: `frames` slices/frames of `grid_h x grid_w`
    patches (frames = 1 for a 2D image)."""

    frames: int
    grid_h: int
    grid_w: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.grid_h * self.grid_w


@dataclass(frozen=True)
class PackedPositions:
    positions: torch.Tensor  # [L, 3] (t, h, w)
    cu_seqlens: torch.Tensor  # int32 [B+1]
    max_seqlen: int


def packed_positions(
    items: Sequence[ItemGrid | tuple[int, int, int]],
    *,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.int32,
) -> PackedPositions:
    """Positions of several items packed one after another, with `cu_seqlens` and the
    longest item's length. Each item is an `ItemGrid` or a `(frames, grid_h, grid_w)`
    tuple; t restarts at 0 in every item."""
    if len(items) == 0:
        raise ValueError("packed_positions needs at least one item")
    grids = [it if isinstance(it, ItemGrid) else ItemGrid(*it) for it in items]
    parts = [
        frame_positions(g.frames, g.grid_h, g.grid_w, device=device, dtype=dtype) for g in grids
    ]
    lengths = [g.num_tokens for g in grids]
    return PackedPositions(
        positions=torch.cat(parts, dim=0),
        cu_seqlens=cu_seqlens_from_lengths(lengths, device=device),
        max_seqlen=max(lengths),
    )
