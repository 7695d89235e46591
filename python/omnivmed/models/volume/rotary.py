"""OmniV-Med's volumes: the slices are frames of one item, each token rotated by its true
(t, h, w), attended jointly by the vision encoder, and pruned like video frames."""

from __future__ import annotations

from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import VolumeItem, VolumeStrategy
from ..registry import VOLUME_STRATEGIES


@VOLUME_STRATEGIES.register("rotary")
class RotaryVolume(VolumeStrategy, nn.Module):
    allows_pruning = True

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        return kept

    def encode(self, item: VolumeItem):
        return item.features, item.positions
