"""How many LLM tokens a visual item becomes, so the prompt gets exactly that many
placeholders. Kept in one place with the connectors' and strategies' rules."""

from __future__ import annotations

from enum import IntEnum

from .configuration import OmniVMedConfig


class VisualKind(IntEnum):
    IMAGE = 0
    VIDEO = 1
    VOLUME = 2


def visual_token_count(
    config: OmniVMedConfig,
    kind: VisualKind | int,
    frames: int,
    grid_h: int,
    grid_w: int,
    kept: int | None = None,
) -> int:
    """LLM tokens for one item of `frames` x (grid_h x grid_w) patches, of which `kept`
    survive pruning (all when None)."""
    kind = VisualKind(int(kind))
    kept = frames * grid_h * grid_w if kept is None else kept
    if kind == VisualKind.VOLUME and config.volume_strategy == "slice_avg":
        features = grid_h * grid_w
    elif kind == VisualKind.VOLUME and config.volume_strategy == "slice_attn":
        features = config.volume_tokens
    elif kind == VisualKind.VOLUME and config.volume_strategy == "encoder3d":
        features = config.encoder3d_config.num_output_tokens
    else:
        features = kept
    if config.connector == "mlp":
        return features
    if config.connector == "merge_mlp":
        if features % 4:
            raise ValueError(f"merge_mlp connector: {features} features are not whole 2x2 blocks")
        return features // 4
    return config.connector_queries  # resampler
