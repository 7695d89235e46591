"""Every slice through the 2D encoder on its own, then all slices' tokens side by side:
S x grid_h x grid_w features in slice order, each at its true (slice, row, column). The
connector decides how many LLM tokens they become (MedM-VL's CT models pool them with
learned queries, `attn_pool_mlp`)."""

from __future__ import annotations

from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import VolumeItem, VolumeStrategy
from ..registry import VOLUME_STRATEGIES


@VOLUME_STRATEGIES.register("slice_concat")
class SliceConcat(VolumeStrategy, nn.Module):
    encodes_slices_separately = True

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        return kept

    def encode(self, item: VolumeItem):
        return item.features, item.positions
