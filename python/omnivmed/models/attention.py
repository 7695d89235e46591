"""Variable-length (rotary) attention over packed items.

Uses the `omnivmed_ext.rope_attention` op for the head dims it supports (64, 72, 80, 96,
128); otherwise, or with dropout, `rope_nd` on q and k, then PyTorch's scaled dot-product
attention per item (or one call with a block-diagonal mask when the pack is small).
Without rotary sections (a learned position embedding instead) q and k go to SDPA as
they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

import omnivmed_ext

_BLOCK_MASK_LIMIT = 4096  # total tokens up to which one masked SDPA call is cheaper


def varlen_rotary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sections: Sequence[int] | None,
    theta: float,
    dropout_p: float = 0.0,
    check_seqlens: bool = True,
) -> torch.Tensor:
    """q, k, v `[L, H, D]`; bidirectional attention inside each item of `cu_seqlens`, q
    and k rotated by `positions` (not rotated when `sections` is None).
    `check_seqlens=False` skips `rope_attention`'s host-side check of the offsets (done once
    per forward by the caller instead of once per layer)."""
    rotary = sections is not None
    if rotary and dropout_p == 0.0 and q.shape[-1] in omnivmed_ext.attention.SUPPORTED_HEAD_DIMS:
        return omnivmed_ext.rope_attention(
            q, k, v, positions, cu_seqlens, max_seqlen, sections, theta,
            check_seqlens=check_seqlens,
        )  # fmt: skip
    if rotary:
        q = omnivmed_ext.rope_nd(q, positions, sections, theta)
        k = omnivmed_ext.rope_nd(k, positions, sections, theta)
    total = q.shape[0]
    bounds = cu_seqlens.tolist()
    if len(bounds) == 2:
        return _sdpa(q, k, v, None, dropout_p)
    if total <= _BLOCK_MASK_LIMIT:
        item = torch.repeat_interleave(
            torch.arange(len(bounds) - 1, device=q.device),
            torch.diff(cu_seqlens.to(q.device).long()),
            output_size=total,
        )
        mask = item[:, None] == item[None, :]
        return _sdpa(q, k, v, mask, dropout_p)
    outs = [_sdpa(q[a:b], k[a:b], v[a:b], None, dropout_p) for a, b in pairwise(bounds)]
    return torch.cat(outs, dim=0)


def _sdpa(q, k, v, mask, dropout_p):
    # [L, H, D] -> [1, H, L, D]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        dropout_p=dropout_p,
    )
    return out.squeeze(0).transpose(0, 1)


def frame_cu_seqlens(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Split every item of a pack into its frames (runs of equal t): the attention scope
    "frame" attends within one slice or frame only."""
    total = positions.shape[0]
    if total == 0:
        return cu_seqlens
    starts = torch.zeros(total, dtype=torch.bool, device=positions.device)
    starts[0] = True
    starts[1:] = positions[1:, 0] != positions[:-1, 0]
    item_starts = cu_seqlens[:-1].long()
    starts[item_starts[item_starts < total]] = True  # an empty last item starts nowhere
    idx = starts.nonzero().squeeze(1)
    return torch.cat((idx, idx.new_tensor([total]))).to(torch.int32)
