"""MedM-VL's `attn_pooling` connector: `connector_queries` learned queries attend over all
of an item's features at once (a CT volume: every slice's patches), with 8 heads, no
LayerNorm before and no residual after, then the 2-layer MLP (Linear, exact GELU,
Linear). An item becomes `connector_queries` LLM tokens whatever its size.

It differs from `resampler` on purpose: that one normalises the features and the pooled
tokens and projects with one Linear."""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import Connector
from ..registry import CONNECTORS


@CONNECTORS.register("attn_pool_mlp")
class AttentionPoolMLPConnector(Connector, nn.Module):
    # Fixed in MedM-VL's code, not in its configs; the vision width must divide by it.
    num_heads: ClassVar[int] = 8

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.num_queries = config.connector_queries
        self.query = nn.Parameter(torch.randn(self.num_queries, vision_dim) * vision_dim**-0.5)
        self.attn = nn.MultiheadAttention(vision_dim, self.num_heads, batch_first=True)
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        return config.connector_queries

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        super().check_config(config)
        if config.connector_queries < 1:
            raise ValueError(
                f"connector 'attn_pool_mlp' needs connector_queries >= 1, got "
                f"{config.connector_queries}"
            )
        width = config.vision_config.hidden_size
        if width % cls.num_heads:
            raise ValueError(
                f"connector 'attn_pool_mlp' attends with {cls.num_heads} heads, so the vision "
                f"hidden_size must divide by {cls.num_heads}, got {width}"
            )

    def forward(self, features, positions, cu_seqlens):
        bounds = cu_seqlens.tolist()
        pooled = []
        # One item at a time: items differ in length, and none is padded (a padded key
        # would change nothing only with a mask; without one the numbers stay MedM-VL's).
        for a, b in itertools.pairwise(bounds):
            if b <= a:
                raise ValueError("connector 'attn_pool_mlp': a visual item has no features")
            keys = features[a:b].unsqueeze(0)
            out, _ = self.attn(
                self.query.unsqueeze(0).to(keys.dtype), keys, keys, need_weights=False
            )
            pooled.append(out[0])
        tokens = self.linear_2(self.act(self.linear_1(torch.cat(pooled))))
        new_cu = torch.arange(len(pooled) + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        return tokens, new_cu * self.num_queries
