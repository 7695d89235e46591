"""Cross-attention resampler: `connector_queries` learned queries attend over each item's
features, giving a fixed number of tokens per item whatever its size."""

from __future__ import annotations

import torch
from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import Connector
from ..registry import CONNECTORS
from .pooling import LearnedQueryPooling


@CONNECTORS.register("resampler")
class ResamplerConnector(Connector, nn.Module):
    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        self.num_queries = config.connector_queries
        self.pool = LearnedQueryPooling(vision_dim, self.num_queries)
        self.norm_out = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, config.text_config.hidden_size)

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        return config.connector_queries

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        super().check_config(config)
        if config.connector_queries < 1:
            raise ValueError(
                f"connector 'resampler' needs connector_queries >= 1, got {config.connector_queries}"
            )

    def forward(self, features, positions, cu_seqlens):
        lengths = torch.diff(cu_seqlens.long())
        items = lengths.numel()
        longest = int(lengths.max()) if items else 0
        padded = features.new_zeros(items, longest, features.shape[-1])
        pad_mask = torch.ones(items, longest, dtype=torch.bool, device=features.device)
        for i, (a, b) in enumerate(
            zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
        ):
            padded[i, : b - a] = features[a:b]
            pad_mask[i, : b - a] = False
        out = self.pool(padded, pad_mask)
        out = self.proj(self.norm_out(out)).reshape(items * self.num_queries, -1)
        new_cu = (
            torch.arange(items + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
            * self.num_queries
        )
        return out, new_cu
