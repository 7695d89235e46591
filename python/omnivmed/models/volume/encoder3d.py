"""A 3D vision transformer for volumes (M3D-style, MedM-VL's 3D encoder).

The volume, resampled to a fixed `volume_size`, is cut into 3D patches, embedded with a
learned 3D position embedding (and an optional class token), encoded, and average-pooled
over the patch grid to fewer tokens. Pretrained M3D-CLIP weights load with
`load_pretrained` (see `m3d_clip.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from ..configuration import OmniVMedConfig, OmniVMedEncoder3DConfig
from ..parts import VolumeInput, VolumeItem, VolumeStrategy
from ..registry import VOLUME_STRATEGIES

_ENCODER3D_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_channels", "volume_size", "patch_size_3d", "pool", "hidden_act", "layer_norm_eps",
    "cls_token", "final_norm",
)  # fmt: skip


class _Block(nn.Module):
    def __init__(self, config: OmniVMedEncoder3DConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = nn.MultiheadAttention(dim, config.num_attention_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Encoder3D(nn.Module):
    """volumes `[B, C, D, H, W]` at `config.volume_size` -> `[B, num_output_tokens, hidden]`."""

    def __init__(self, config: OmniVMedEncoder3DConfig) -> None:
        super().__init__()
        self.config = config
        pd, ph, pw = config.patch_size_3d
        self.patch_embedding = nn.Linear(config.num_channels * pd * ph * pw, config.hidden_size)
        grid = config.grid
        self.position_embedding = nn.Parameter(
            torch.zeros(grid[0] * grid[1] * grid[2], config.hidden_size)
        )
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if config.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def patch_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """The blocks' output for every 3D patch, `[B, gd*gh*gw, hidden]` in (d, h, w)
        raster order (class token dropped; final norm applied when configured)."""
        c = self.config
        expected = (c.num_channels, *c.volume_size)
        if volumes.dim() != 5 or tuple(volumes.shape[1:]) != expected:
            raise ValueError(
                f"encoder3d: volumes must be [B, {', '.join(map(str, expected))}], got {tuple(volumes.shape)}"
            )
        b = volumes.shape[0]
        (pd, ph, pw), (gd, gh, gw) = c.patch_size_3d, c.grid
        patches = volumes.reshape(b, c.num_channels, gd, pd, gh, ph, gw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, gd * gh * gw, -1)
        x = (
            self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
            + self.position_embedding
        )
        if c.cls_token:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        if c.final_norm:
            x = self.norm(x)
        return x[:, 1:] if c.cls_token else x

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.patch_features(volumes)
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, *c.grid)
        pooled = F.avg_pool3d(grid, kernel_size=c.pool, stride=c.pool)
        return pooled.flatten(2).transpose(1, 2)


@VOLUME_STRATEGIES.register("encoder3d")
class Encoder3DVolume(VolumeStrategy, Encoder3D):
    """The volume strategy whose module is the 3D ViT itself (state-dict names
    `encoder3d.*`)."""

    module_name = "encoder3d"
    input = VolumeInput.VOLUME_3D
    outputs_patch_grid = False

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__(config.encoder3d_config)

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        vision = config.vision_config
        if config.encoder3d_config is None:  # the vision tower's size, M3D's geometry
            config.encoder3d_config = OmniVMedEncoder3DConfig(
                hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size,
                num_hidden_layers=vision.num_hidden_layers,
                num_attention_heads=vision.num_attention_heads,
            )
        if config.encoder3d_config.hidden_size != vision.hidden_size:
            raise ValueError(
                f"volume_strategy 'encoder3d': encoder3d_config.hidden_size "
                f"{config.encoder3d_config.hidden_size} must equal the vision encoder's "
                f"hidden_size {vision.hidden_size} (they share the connector)"
            )

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        return config.encoder3d_config.num_output_tokens

    @classmethod
    def prepare_volume(cls, config: OmniVMedConfig, volume01: torch.Tensor) -> torch.Tensor:
        """`[D, H, W]` in [0, 1] -> `[C, *volume_size]` (trilinear; gray repeated to C)."""
        c3 = config.encoder3d_config
        vol = torch.as_tensor(volume01).float()
        if vol.dim() != 3:
            raise ValueError(f"encoder3d: a volume must be [D, H, W], got {tuple(vol.shape)}")
        resized = F.interpolate(vol[None, None], size=tuple(c3.volume_size), mode="trilinear")[0]
        return resized.expand(c3.num_channels, -1, -1, -1).clone()

    def encode(self, item: VolumeItem):
        if item.volume is None:
            raise ValueError("volume_strategy 'encoder3d' needs one `volumes` entry per volume")
        features = self(item.volume[None])[0]
        positions = torch.zeros(features.shape[0], 3, dtype=torch.int32, device=features.device)
        return features, positions

    @classmethod
    def pretrained_config_overrides(cls, path: Path, config_overrides: dict) -> dict:
        """The encoder3d_config of an M3D checkpoint; fields asked for (pool, final_norm,
        ...) win."""
        from .m3d_clip import m3d_encoder3d_config

        asked = config_overrides.get("encoder3d_config") or {}
        if isinstance(asked, OmniVMedEncoder3DConfig):
            asked = {k: v for k, v in asked.to_dict().items() if k in _ENCODER3D_FIELDS}
        return {"encoder3d_config": m3d_encoder3d_config(path, **asked)}

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        from .m3d_clip import load_m3d_vision_weights

        return load_m3d_vision_weights(self, path)
