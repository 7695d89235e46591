"""Packing visual items (already read and normalized) into the model's visual inputs:
patchify, prune slices and frames, count each item's LLM tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import omnivmed_ext

from ..models.configuration import OmniVMedConfig
from ..models.kinds import VisualKind
from ..models.parts import ModelParts
from .options import ProcessorOptions
from .patchify import patchify


@dataclass
class VisualItem:
    """One image (`[1, C, H, W]`), video (`[F, C, H, W]`) or volume (`[S, C, H, W]`
    slices), with H and W multiples of the patch size. `t_values`, when given, are the
    frames' t positions (increasing), else t is the frame's index. `volume3d` is the fixed-size
    `[C, D, H, W]` volume for a strategy that takes whole volumes (`VolumeInput.VOLUME_3D`)."""

    kind: VisualKind
    frames: torch.Tensor | None = None
    volume3d: torch.Tensor | None = None
    # The t of each frame when it is not the frame's index (true time or slice position).
    t_values: list[int] | None = None


@dataclass
class VisualBatch:
    pixel_values: torch.Tensor
    visual_positions: torch.Tensor
    visual_cu_seqlens: torch.Tensor
    visual_kinds: torch.Tensor
    visual_grids: torch.Tensor
    volumes: torch.Tensor | None
    token_counts: list[int] = field(default_factory=list)
    unpruned_counts: list[int] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        return self.visual_kinds.numel()

    @classmethod
    def concat(cls, batches: Sequence[VisualBatch]) -> VisualBatch:
        """Several samples' batches as one, items in order (a batch of several prompts
        hands the model every sample's items in the order of its rows)."""
        if not batches:
            raise ValueError("VisualBatch.concat needs at least one batch")
        lengths = torch.cat([torch.diff(b.visual_cu_seqlens.long()) for b in batches])
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        volumes = [b.volumes for b in batches if b.volumes is not None]
        return cls(
            pixel_values=torch.cat([b.pixel_values for b in batches]),
            visual_positions=torch.cat([b.visual_positions for b in batches]),
            visual_cu_seqlens=cu,
            visual_kinds=torch.cat([b.visual_kinds for b in batches]),
            visual_grids=torch.cat([b.visual_grids for b in batches]),
            volumes=torch.cat(volumes) if volumes else None,
            token_counts=[n for b in batches for n in b.token_counts],
            unpruned_counts=[n for b in batches for n in b.unpruned_counts],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {
            "pixel_values": self.pixel_values,
            "visual_positions": self.visual_positions,
            "visual_cu_seqlens": self.visual_cu_seqlens,
            "visual_kinds": self.visual_kinds,
            "visual_grids": self.visual_grids,
        }
        if self.volumes is not None:
            out["volumes"] = self.volumes
        return out


def pack_visual_items(
    items: list[VisualItem],
    config: OmniVMedConfig,
    options: ProcessorOptions | None = None,
    prune: bool | None = None,
    parts: ModelParts | None = None,
) -> VisualBatch:
    """Patchify every item, prune slices/frames where the parts allow it (`options.prune`,
    `prune_threshold`, `prune_mode`; `prune` overrides the first), and pack them in order.
    `token_counts[i]` is how many placeholders item i needs. `parts`: the config's parts
    when the caller holds them already (a processor does)."""
    options = options or ProcessorOptions()
    prune = options.prune if prune is None else prune
    threshold = options.prune_threshold
    parts = parts or ModelParts.of(config)
    ps = config.vision_config.patch_size
    values, positions, lengths, kinds, grids, volumes = [], [], [], [], [], []
    counts, unpruned = [], []
    for item in items:
        kind = VisualKind(int(item.kind))
        kinds.append(int(kind))
        if parts.uses_volume_3d(kind):
            if item.volume3d is None:
                raise ValueError(
                    f"volume_strategy {config.volume_strategy!r} takes whole volumes: "
                    "VisualItem.volume3d is missing"
                )
            volumes.append(item.volume3d)
            grids.append([1, 1, 1])
            lengths.append(0)
            n = parts.token_count(config, kind, 1, 1, 1)
            counts.append(n)
            unpruned.append(n)
            continue
        patches = patchify(item.frames, ps)
        f, n, p = patches.shape
        gh, gw = item.frames.shape[2] // ps, item.frames.shape[3] // ps
        grids.append([f, gh, gw])
        if prune and threshold > 0 and f > 1 and parts.may_prune(kind):
            kept = omnivmed_ext.l1_prune(
                patches, torch.tensor([0, f], dtype=torch.int32), (gh, gw), threshold,
                options.prune_mode, config.prune_unit,
            )  # fmt: skip
            values.append(kept.values)
            item_positions = kept.positions
        else:
            values.append(patches.reshape(f * n, p))
            item_positions = omnivmed_ext.frame_positions(f, gh, gw)
        if item.t_values is not None:
            if len(item.t_values) != f:
                raise ValueError(
                    f"VisualItem.t_values has {len(item.t_values)} entries for {f} frames"
                )
            table = torch.tensor(item.t_values, dtype=item_positions.dtype)
            item_positions = item_positions.clone()
            item_positions[:, 0] = table[item_positions[:, 0].long()]
        positions.append(item_positions)
        lengths.append(values[-1].shape[0])
        counts.append(parts.token_count(config, kind, f, gh, gw, kept=lengths[-1]))
        unpruned.append(parts.token_count(config, kind, f, gh, gw))
    p = config.vision_config.patch_values
    return VisualBatch(
        pixel_values=torch.cat(values) if values else torch.zeros(0, p),
        visual_positions=torch.cat(positions)
        if positions
        else torch.zeros(0, 3, dtype=torch.int32),
        visual_cu_seqlens=omnivmed_ext.cu_seqlens_from_lengths(lengths),
        visual_kinds=torch.tensor(kinds, dtype=torch.int64),
        visual_grids=torch.tensor(grids, dtype=torch.int64),
        volumes=torch.stack(volumes) if volumes else None,
        token_counts=counts,
        unpruned_counts=unpruned,
    )
