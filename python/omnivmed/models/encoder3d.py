"""A 3D vision transformer (M3D-style): the volume is cut into 3D patches, embedded with a
learned 3D position embedding, encoded, and pooled spatially to fewer tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .configuration import OmniVMedEncoder3DConfig
from .registry import ENCODERS


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


@ENCODERS.register("encoder3d")
class Encoder3D(nn.Module):
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
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes `[B, C, D, H, W]` at `config.volume_size` -> `[B, num_output_tokens, hidden]`."""
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
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        grid = x.transpose(1, 2).reshape(b, -1, gd, gh, gw)
        pooled = F.avg_pool3d(grid, kernel_size=c.pool, stride=c.pool)
        return pooled.flatten(2).transpose(1, 2)
