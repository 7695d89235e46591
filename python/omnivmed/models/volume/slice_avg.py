"""MedM-VL's 2D-Avg: a 2D encoder sees every slice on its own, then each patch position's
feature is averaged over the slices (grid_h x grid_w tokens whatever the depth)."""

from __future__ import annotations

from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import VolumeItem, VolumeStrategy
from ..registry import VOLUME_STRATEGIES


@VOLUME_STRATEGIES.register("slice_avg")
class SliceAverage(VolumeStrategy, nn.Module):
    encodes_slices_separately = True

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        return grid_h * grid_w

    def encode(self, item: VolumeItem):
        expected = item.frames * item.grid_h * item.grid_w
        if item.features.shape[0] != expected:
            raise ValueError(
                f"slice_avg: a volume of {item.frames} slices of {item.grid_h}x{item.grid_w} "
                f"patches needs all {expected} tokens, got {item.features.shape[0]}"
            )
        per_slice = item.grid_h * item.grid_w
        features = item.features.view(item.frames, per_slice, -1).mean(dim=0)
        return features, item.positions[:per_slice].clone()  # the first slice's (0, h, w)
