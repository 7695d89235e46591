"""OmniV-Med's vision encoder: SigLIP with rotary (t, h, w) positions.

No learned position embedding: every attention layer rotates q and k by the token's true
position, so any resolution, any number of slices or frames and any subset of kept tokens
work, and pruning is allowed. With `position_encoding="learned"` in the vision config it
keeps SigLIP's learned embedding instead (interpolated to each grid, rotary off): the
"fixed position embedding" arm of OmniV-Med's Table 4, at native resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configuration import OmniVMedVisionConfig
from ..parts import VisionEncoder
from ..registry import ENCODERS
from .siglip_tower import SiglipTower
from .siglip_weights import load_siglip_weights


@ENCODERS.register("rotary_siglip")
class RotaryVisionTower(VisionEncoder, SiglipTower):
    """SigLIP vision encoder with rotary (t, h, w) positions over packed items."""

    supports_pruning = True

    @classmethod
    def vision_config_from_pretrained(
        cls, hf_config: Any, **overrides: Any
    ) -> OmniVMedVisionConfig:
        return OmniVMedVisionConfig.from_siglip(hf_config, **overrides)

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        return load_siglip_weights(self, path)
