"""MedM-VL's ways of turning a slice stack into a fixed set of features, after a 2D
encoder has seen every slice separately.

- `slice_avg`: the mean over slices of each patch position's feature (N tokens).
- `slice_attn`: learned queries attend over every slice's features (a fixed number of
  tokens, whatever the number of slices).
"""

from __future__ import annotations

import torch

from .connectors import LearnedQueryPooling


def slice_average(features: torch.Tensor, frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """features `[frames * gh * gw, D]` of one volume, slice-major -> `[gh * gw, D]`."""
    expected = frames * grid_h * grid_w
    if features.shape[0] != expected:
        raise ValueError(
            f"slice_avg: a volume of {frames} slices of {grid_h}x{grid_w} patches needs all "
            f"{expected} tokens, got {features.shape[0]}; slice strategies need pruning off"
        )
    return features.view(frames, grid_h * grid_w, -1).mean(dim=0)


class SliceAttentionCompressor(LearnedQueryPooling):
    """Cross-attention compression of all slices' features to `num_tokens` tokens."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int | None = None) -> None:
        super().__init__(dim, num_tokens, num_heads)
        self.num_tokens = num_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """features `[T, D]` of one volume -> `[num_tokens, D]`."""
        return super().forward(features.unsqueeze(0)).squeeze(0)
