"""2x2 spatial merge (as in Qwen2-VL), then a 2-layer MLP: a quarter of the tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import Connector
from ..registry import CONNECTORS


@CONNECTORS.register("merge_mlp")
class MergeMLPConnector(Connector, nn.Module):
    """The four features of each 2x2 block of one frame are concatenated, then a 2-layer
    MLP maps them to one LLM token. Blocks are found from the positions, so pruned inputs
    work as long as whole 2x2 blocks were kept (prune with unit=2)."""

    grid_unit = 2
    needs_patch_grid = True

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        self.norm = nn.LayerNorm(vision_dim, eps=config.vision_config.layer_norm_eps)
        self.linear_1 = nn.Linear(4 * vision_dim, 4 * vision_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(4 * vision_dim, config.text_config.hidden_size)

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        if features % 4:
            raise ValueError(f"merge_mlp connector: {features} features are not whole 2x2 blocks")
        return features // 4

    def forward(self, features, positions, cu_seqlens):
        lengths = torch.diff(cu_seqlens.long())
        item = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=features.device), lengths.to(features.device)
        )
        pos = positions.long()
        t, h2, w2 = pos[:, 0], pos[:, 1] // 2, pos[:, 2] // 2
        t_span, h_span, w_span = (int(v.max()) + 1 for v in (t, h2, w2))
        key = ((item * t_span + t) * h_span + h2) * w_span + w2
        order = torch.argsort(key, stable=True)  # stable: the block's raster order is kept
        _, counts = torch.unique_consecutive(key[order], return_counts=True)
        if (counts != 4).any():
            raise ValueError(
                "merge_mlp connector: every 2x2 block of patches must be complete, but "
                f"{int((counts != 4).sum())} blocks have {sorted(set(counts.tolist()) - {4})} "
                "patches; use even grids and prune with unit=2"
            )
        merged = self.norm(features)[order].reshape(-1, 4 * features.shape[-1])
        new_lengths = lengths // 4
        new_cu = torch.zeros_like(cu_seqlens)
        new_cu[1:] = torch.cumsum(new_lengths, 0).to(cu_seqlens.dtype)
        return self.linear_2(self.act(self.linear_1(merged))), new_cu
