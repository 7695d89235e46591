"""SigLIP's vision transformer on packed patches: the network both SigLIP encoders share.

It runs on `patches [L, P]` (P = C*ps*ps values in (channel, row, column) order),
their `positions [L, 3]` (t, h, w) and the items' `cu_seqlens`. The patch embedding is
SigLIP's convolution written as a linear map. Positions enter either as rotary angles in
every attention layer (`position_encoding="rope"`) or as SigLIP's learned absolute
embedding added once to the patch embeddings (`"learned"`).

Per forward, the pack is prepared once (the offsets checked and the longest item found on
the host, the only synchronisation); the layers then run without reading any device
value, so they can be captured or compiled (:meth:`SiglipTower.compile_layers`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

import omnivmed_ext

from ..attention import frame_cu_seqlens, varlen_rotary_attention
from ..configuration import OmniVMedVisionConfig


class VisionAttention(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def qkv_projection(self, hidden: torch.Tensor) -> torch.Tensor:
        """q, k and v of `hidden` [L, dim] as one matrix product -> `[L, 3, H, D]`.

        The weights stay three `nn.Linear`s (SigLIP's checkpoint names) and are
        concatenated here: a copy of 3*dim*dim values, small beside the product over L
        tokens, and under torch.compile it fuses into the graph."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections])
        return F.linear(hidden, weight, bias).view(hidden.shape[0], 3, self.num_heads, -1)

    def forward(self, hidden, positions, cu_seqlens, max_seqlen):
        length = hidden.shape[0]
        q, k, v = self.qkv_projection(hidden).unbind(1)  # [L, H, D] views
        out = varlen_rotary_attention(
            q, k, v, positions, cu_seqlens, max_seqlen,
            self.config.rope_sections if self.config.rotary else None, self.config.rope_theta,
            self.config.attention_dropout if self.training else 0.0,
            check_seqlens=False,  # the tower checked the pack once
        )  # fmt: skip
        return self.out_proj(out.reshape(length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden, positions, cu_seqlens, max_seqlen):
        hidden = hidden + self.self_attn(
            self.layer_norm1(hidden), positions, cu_seqlens, max_seqlen
        )
        return hidden + self.mlp(self.layer_norm2(hidden))


def interpolate_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A square learned embedding `[side*side, D]` resized to `grid` (rows, cols) as
    SigLIP's `interpolate_pos_encoding` does (bicubic, align_corners=False; the table
    itself at its own size) -> `[rows*cols, D]` in raster order."""
    side = round(table.shape[0] ** 0.5)
    if tuple(grid) == (side, side):
        return table
    dim = table.shape[1]
    square = table.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(-1, dim).to(table.dtype)


class SiglipTower(nn.Module):
    """Patch embedding, (learned position embedding,) encoder layers, (post-layernorm)."""

    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_values, config.hidden_size)
        if not config.rotary:  # SigLIP's name, so its checkpoints map one to one
            self.position_embedding = nn.Embedding(config.position_grid**2, config.hidden_size)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        if config.use_post_layernorm:
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def compile_layers(self, **options) -> None:
        """Compile each encoder layer in place with `torch.compile(**options)` (regional
        compilation: all layers share one compiled graph, so compiling costs one layer's
        time, not the tower's). The rotary attention ops are `torch.library` ops with fake
        kernels, so a layer compiles without graph breaks."""
        for layer in self.layers:
            layer.compile(**options)

    def forward(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """patches `[L, P]`, positions `[L, 3]`, cu_seqlens int32 `[B+1]` -> `[L, hidden]`."""
        if patches.dim() != 2 or patches.shape[1] != self.config.patch_values:
            raise ValueError(
                f"vision tower: patches must be [L, {self.config.patch_values}] (C*ps*ps = "
                f"{self.config.num_channels}*{self.config.patch_size}*{self.config.patch_size}), "
                f"got {tuple(patches.shape)}"
            )
        if positions.shape != (patches.shape[0], 3):
            raise ValueError(
                f"vision tower: positions must be [{patches.shape[0]}, 3], got {tuple(positions.shape)}"
            )
        hidden = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        if not self.config.rotary:
            hidden = hidden + self.learned_positions(positions, cu_seqlens)
        if self.config.attention_scope == "frame":
            cu_seqlens = frame_cu_seqlens(positions, cu_seqlens)
            max_seqlen = None
        if max_seqlen is None:
            max_seqlen = int(torch.diff(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0
        if not torch.compiler.is_compiling():
            omnivmed_ext.attention.validate_cu_seqlens(cu_seqlens, patches.shape[0], max_seqlen)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(
                    layer, hidden, positions, cu_seqlens, max_seqlen, use_reentrant=False
                )
            else:
                hidden = layer(hidden, positions, cu_seqlens, max_seqlen)
        return self.post_layernorm(hidden) if self.config.use_post_layernorm else hidden

    def learned_positions(self, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The learned embedding of every token at its (h, w), interpolated per item to the
        item's grid. An item's grid is the extent of its positions: pruning keeps every
        item's first frame whole, so the extent is the full grid."""
        total = positions.shape[0]
        table = self.position_embedding.weight
        out = table.new_zeros(total, table.shape[1])
        if total == 0:
            return out
        lengths = torch.diff(cu_seqlens.long()).to(positions.device)
        item = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=positions.device), lengths, output_size=total
        )
        h, w = positions[:, 1].long(), positions[:, 2].long()
        extent = torch.zeros(lengths.numel(), 2, dtype=torch.long, device=positions.device)
        extent[:, 0].scatter_reduce_(0, item, h + 1, "amax")
        extent[:, 1].scatter_reduce_(0, item, w + 1, "amax")
        token_grid = extent[item]
        for rows, cols in {tuple(g) for g in extent[lengths > 0].tolist()}:
            mask = (token_grid[:, 0] == rows) & (token_grid[:, 1] == cols)
            grid_table = interpolate_position_table(table, (rows, cols))
            out[mask] = grid_table[h[mask] * cols + w[mask]]
        return out
