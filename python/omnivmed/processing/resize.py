"""Native resolution: sizes snapped to the patch grid within pixel budgets, frame and
slice budgets, and resampling."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F


def snap_size(
    height: int, width: int, multiple: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The size closest to (height, width) with both sides multiples of `multiple` and an
    area in [min_pixels, max_pixels], keeping the aspect ratio."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} > max_pixels {max_pixels}")
    h = max(multiple, round(height / multiple) * multiple)
    w = max(multiple, round(width / multiple) * multiple)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(multiple, math.floor(height / scale / multiple) * multiple)
        w = max(multiple, math.floor(width / scale / multiple) * multiple)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / multiple) * multiple
        w = math.ceil(width * scale / multiple) * multiple
    # Rounding can overshoot either bound: step the longer side down / the shorter side up.
    while h * w > max_pixels and max(h, w) > multiple:
        if h >= w:
            h -= multiple
        else:
            w -= multiple
    while h * w < min_pixels:
        if h <= w:
            h += multiple
        else:
            w += multiple
    if h * w > max_pixels:
        h, w = _closest_in_range(height / width, multiple, min_pixels, max_pixels)
    return h, w


def _closest_in_range(
    aspect: float, multiple: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Tight budgets: the grid-aligned size with an area in range whose aspect is closest."""
    best = None
    for h in range(multiple, max_pixels // multiple + 1, multiple):
        low = math.ceil(min_pixels / h / multiple) * multiple
        high = (max_pixels // h) // multiple * multiple
        for w in {max(low, multiple), high, max(multiple, round(h / aspect / multiple) * multiple)}:
            if w < multiple or not min_pixels <= h * w <= max_pixels:
                continue
            score = abs(math.log((h / w) / aspect))
            if best is None or score < best[0]:
                best = (score, h, w)
    if best is None:
        raise ValueError(
            f"no size with sides that are multiples of {multiple} has an area in "
            f"[{min_pixels}, {max_pixels}] (aspect {aspect:.3f})"
        )
    return best[1], best[2]


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[F, C, H, W]` -> `[F, C, *size]` (bilinear, antialiased when shrinking)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    shrink = size[0] < frames.shape[-2] or size[1] < frames.shape[-1]
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_frames_pil_bicubic(frames01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[F, H, W]` or `[F, H, W, C]` (C = 1 or 3) in [0, 1] -> `[F, *size, 3]` in [0, 1]:
    each frame as 8-bit RGB (grey repeated), resized by Pillow's bicubic filter to
    (height, width) = `size` whatever its aspect ratio, as SigLIP's image processor does.
    Values that came from 8-bit levels (an image / 255) get exactly those levels back."""
    from PIL import Image

    x = frames01 if frames01.ndim == 4 else frames01[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"frames must have 1 or 3 channels, got shape {frames01.shape}")
    levels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    out = np.empty((x.shape[0], size[0], size[1], 3), dtype=np.float32)
    for i, frame in enumerate(levels):
        resized = Image.fromarray(frame, "RGB").resize((size[1], size[0]), Image.BICUBIC)
        out[i] = np.asarray(resized, dtype=np.float32) / 255.0
    return out


def uniform_indices(total: int, budget: int) -> list[int]:
    """At most `budget` indices spread evenly over range(total), first and last included."""
    if total <= 0:
        raise ValueError("nothing to sample from")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if total <= budget:
        return list(range(total))
    return np.linspace(0, total - 1, budget).round().astype(int).tolist()
