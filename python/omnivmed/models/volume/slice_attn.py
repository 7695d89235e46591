"""MedM-VL's 2D-Attn: a 2D encoder sees every slice on its own, then `volume_tokens`
learned queries attend over all slices' features (a fixed token count whatever the depth).

With `volume_key_positions` (off by default, as in MedM-VL) each key also carries a
sinusoidal code of its (slice index, row, column), so the queries can tell slices and
places apart; the pooled values stay the features themselves. The code has no
parameters, so the option does not change the checkpoint.
"""

from __future__ import annotations

import math

import torch

from ..configuration import OmniVMedConfig
from ..connectors.pooling import LearnedQueryPooling
from ..parts import VolumeItem, VolumeStrategy
from ..registry import VOLUME_STRATEGIES


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(t, h, w) `[T, 3]` -> `[T, dim]`: a quarter of the channels code t, h and w share
    the rest; each axis as sin/cos pairs at geometric frequencies (10000^(-2i/d))."""
    t_dim = (dim // 4) // 2 * 2
    h_dim = ((dim - t_dim) // 2) // 2 * 2
    w_dim = (dim - t_dim - h_dim) // 2 * 2
    parts = []
    for axis, width in enumerate((t_dim, h_dim, w_dim)):
        if width == 0:
            continue
        freqs = torch.exp(
            torch.arange(0, width, 2, device=positions.device, dtype=torch.float32)
            * (-math.log(10000.0) / width)
        )
        angles = positions[:, axis].float()[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, dim=1) if parts else positions.new_zeros(positions.shape[0], 0).float()
    return torch.nn.functional.pad(code, (0, dim - code.shape[1]))


@VOLUME_STRATEGIES.register("slice_attn")
class SliceAttention(VolumeStrategy, LearnedQueryPooling):
    module_name = "slice_compressor"
    encodes_slices_separately = True
    outputs_patch_grid = False

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__(config.vision_config.hidden_size, config.volume_tokens)
        self.key_positions = bool(config.volume_key_positions)

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        if config.volume_tokens < 1:
            raise ValueError(
                f"volume_strategy 'slice_attn' needs volume_tokens >= 1, got {config.volume_tokens}"
            )

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        return config.volume_tokens

    def encode(self, item: VolumeItem):
        offsets = None
        if self.key_positions:
            offsets = sinusoidal_positions(item.positions, item.features.shape[-1])[None]
        pooled = self(item.features[None], key_offsets=offsets)[0]
        positions = torch.zeros(pooled.shape[0], 3, dtype=torch.int32, device=pooled.device)
        return pooled, positions
