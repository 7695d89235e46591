"""Learned-query cross-attention pooling, shared by the resampler connector and the
slice-attention volume strategy."""

from __future__ import annotations

import torch
from torch import nn


def attention_heads_for(dim: int) -> int:
    """Heads of about 64 channels that divide `dim` (for the cross-attention modules)."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class LearnedQueryPooling(nn.Module):
    """`num_queries` learned queries attend over a set of features (layer-normed): a fixed
    number of tokens whatever the set's size. `key_offsets` (same shape as the features),
    when given, are added to the keys only, so positions steer where the queries look
    without entering the pooled values."""

    def __init__(self, dim: int, num_queries: int, num_heads: int | None = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(
            dim, num_heads or attention_heads_for(dim), batch_first=True
        )

    def forward(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        key_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features `[B, T, D]` (padding_mask `[B, T]`, True = padding) -> `[B, Q, D]`."""
        values = self.norm(features)
        keys = values if key_offsets is None else values + key_offsets.to(values.dtype)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(queries, keys, values, key_padding_mask=padding_mask, need_weights=False)
        return out
