"""What pruning keeps, for the viewer: every frame (slice, or the image) at the encoder's
resolution as a PNG, with the patches that pruning removed shaded, and the kept/total
token counts per frame."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ..processing import pack_visual_items
from ..processing.processor import Media, OmniVMedProcessor


def preview(processor: OmniVMedProcessor, media: Media) -> dict[str, Any]:
    o = processor.options
    item = processor.to_item(processor.read(media))
    frames = item.frames  # [F, C, H, W], normalised
    patch = processor.config.vision_config.patch_size
    batch = pack_visual_items([item], processor.config, o, prune=True, parts=processor.parts)
    grid_h, grid_w = frames.shape[-2] // patch, frames.shape[-1] // patch
    kept = np.zeros((frames.shape[0], grid_h, grid_w), dtype=bool)
    t_of = {t: i for i, t in enumerate(item.t_values)} if item.t_values else None
    for t, h, w in batch.visual_positions.tolist():
        f = t_of[t] if t_of is not None else t
        if 0 <= f < kept.shape[0] and 0 <= h < grid_h and 0 <= w < grid_w:
            kept[f, h, w] = True
    mean = np.asarray(o.image_mean[: frames.shape[1]], dtype=np.float32)[:, None, None]
    std = np.asarray(o.image_std[: frames.shape[1]], dtype=np.float32)[:, None, None]
    out = []
    for f in range(frames.shape[0]):
        rgb = np.clip(frames[f].float().numpy() * std + mean, 0, 1)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        rgb = rgb.transpose(1, 2, 0)
        removed = np.repeat(np.repeat(~kept[f], patch, axis=0), patch, axis=1)
        # Removed patches: darkened and tinted red, so what the model sees stands out.
        rgb[removed] = rgb[removed] * 0.35 + np.array([0.45, 0.0, 0.0])
        buf = io.BytesIO()
        Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append({"png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                    "kept": int(kept[f].sum()), "total": int(grid_h * grid_w)})  # fmt: skip
    return {"kind": media.kind.name.lower(), "frames": out,
            "kept": int(sum(batch.token_counts)), "total": int(sum(batch.unpruned_counts)),
            "kept_patches": int(kept.sum()), "total_patches": int(kept.size)}  # fmt: skip
