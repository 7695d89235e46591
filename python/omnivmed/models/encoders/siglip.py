"""Stock SigLIP (MedM-VL's 2D encoder): the learned absolute position embedding, a fixed
input size (the checkpoint's `image_size`), no pruning.

The processor resizes every frame to the fixed size; the tower still accepts another
grid by bicubic interpolation of the embedding, as transformers' `interpolate_pos_encoding`
does. On the same pixels it equals `SiglipVisionModel(...).last_hidden_state`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configuration import OmniVMedConfig, OmniVMedVisionConfig
from ..parts import VisionEncoder
from ..registry import ENCODERS
from .siglip_tower import SiglipTower
from .siglip_weights import load_siglip_weights


@ENCODERS.register("siglip")
class SiglipVisionTower(VisionEncoder, SiglipTower):
    """SigLIP's vision transformer as released, on the packed-patch interface."""

    # Every frame at the fixed size, whole: its learned embedding was trained that way.
    supports_pruning = False

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        vision = config.vision_config
        if vision.rotary:
            raise ValueError(
                "vision encoder 'siglip' keeps SigLIP's learned position embedding, so its "
                "vision config needs position_encoding='learned', got 'rope' (use "
                "'rotary_siglip' for rotary positions)"
            )

    @classmethod
    def fixed_input_size(cls, vision_config: OmniVMedVisionConfig) -> tuple[int, int]:
        side = vision_config.position_grid * vision_config.patch_size
        return side, side

    @classmethod
    def vision_config_from_pretrained(
        cls, hf_config: Any, **overrides: Any
    ) -> OmniVMedVisionConfig:
        return OmniVMedVisionConfig.from_siglip(
            hf_config, **{"position_encoding": "learned", **overrides}
        )

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        return load_siglip_weights(self, path)
