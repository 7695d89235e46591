"""Connectors: visual features -> LLM embeddings.

Every connector maps packed features `[L, Dv]` with their positions `[L, 3]` and items'
`cu_seqlens` to packed tokens `[L', Dt]` and the items' new `cu_seqlens`.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import CONNECTORS


def attention_heads_for(dim: int) -> int:
    """Heads of about 64 channels that divide `dim` (for the cross-attention modules)."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.diff(cu_seqlens.long())


@CONNECTORS.register("mlp")
class MLPConnector(nn.Module):
    """LLaVA-1.5's projector: Linear, GELU, Linear. One token per visual feature."""

    def __init__(self, vision_dim: int, text_dim: int, **_: object) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features, positions, cu_seqlens):
        return self.linear_2(self.act(self.linear_1(features))), cu_seqlens

    @staticmethod
    def output_length(length: int) -> int:
        return length


@CONNECTORS.register("merge_mlp")
class MergeMLPConnector(nn.Module):
    """2x2 spatial merge (as in Qwen2-VL): the four features of each 2x2 block of one
    frame are concatenated, then a 2-layer MLP maps them to one LLM token. Blocks are found
    from the positions, so pruned inputs work as long as whole 2x2 blocks were kept
    (prune with unit=2)."""

    def __init__(
        self, vision_dim: int, text_dim: int, layer_norm_eps: float = 1e-6, **_: object
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim, eps=layer_norm_eps)
        self.linear_1 = nn.Linear(4 * vision_dim, 4 * vision_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(4 * vision_dim, text_dim)

    def forward(self, features, positions, cu_seqlens):
        lengths = _lengths(cu_seqlens)
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

    @staticmethod
    def output_length(length: int) -> int:
        if length % 4:
            raise ValueError(f"merge_mlp connector: {length} tokens are not whole 2x2 blocks")
        return length // 4


class LearnedQueryPooling(nn.Module):
    """`num_queries` learned queries attend over a set of features (layer-normed): a fixed
    number of tokens whatever the set's size. Serves the resampler connector and MedM-VL's
    slice-attention volume compressor."""

    def __init__(self, dim: int, num_queries: int, num_heads: int | None = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(
            dim, num_heads or attention_heads_for(dim), batch_first=True
        )

    def forward(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features `[B, T, D]` (padding_mask `[B, T]`, True = padding) -> `[B, Q, D]`."""
        kv = self.norm(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(queries, kv, kv, key_padding_mask=padding_mask, need_weights=False)
        return out


@CONNECTORS.register("resampler")
class ResamplerConnector(nn.Module):
    """Cross-attention resampler: `num_queries` learned queries attend over each item's
    features, giving a fixed number of tokens per item whatever its size."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        num_queries: int = 64,
        num_heads: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.pool = LearnedQueryPooling(vision_dim, num_queries, num_heads)
        self.norm_out = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, text_dim)

    def forward(self, features, positions, cu_seqlens):
        lengths = _lengths(cu_seqlens)
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

    def output_length(self, length: int) -> int:
        return self.num_queries
