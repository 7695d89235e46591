"""Cutting frames into patches in the layout the vision tower's patch embedding expects."""

from __future__ import annotations

import torch


def patchify(frames: torch.Tensor, patch_size: int) -> torch.Tensor:
    """frames `[F, C, H, W]` -> patches `[F, N, P]`, N = (H/ps)*(W/ps) in row-major grid
    order, P = C*ps*ps in (channel, row, column) order: the order of SigLIP's patch
    convolution weights, so the tower's linear patch embedding reproduces it exactly."""
    if frames.dim() != 4:
        raise ValueError(f"patchify: frames must be [F, C, H, W], got shape {tuple(frames.shape)}")
    f, c, h, w = frames.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"patchify: frame size {h}x{w} is not a multiple of the patch size {patch_size}"
        )
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(f, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(f, gh * gw, c * patch_size * patch_size)


def unpatchify(
    patches: torch.Tensor, grid: tuple[int, int], channels: int, patch_size: int
) -> torch.Tensor:
    """The inverse of `patchify`."""
    f = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(f, gh, gw, channels, patch_size, patch_size)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(f, channels, gh * patch_size, gw * patch_size)
