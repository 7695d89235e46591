"""omnivmed_ext: the fused C++/CUDA ops of omnivmed, usable on their own.

Ops (registered under ``torch.ops.omnivmed``; the functions here validate arguments and
give clear errors):

- :func:`rope_nd`: multi-axis rotary position embedding over (t, h, w), forward and
  backward.
- :func:`rope_attention`: attention inside each packed item with rotary q/k, forward and
  backward: on CPU `rope_nd` + ATen's flash attention per item; on CUDA `rope_nd` + torch's
  varlen flash attention over the pack (the default), a fused kernel (fp16/bf16) or
  `rope_nd` + SDPA per item (see :mod:`omnivmed_ext.attention`).
- :func:`l1_prune` / :func:`l1_prune_padded`: medical-aware token pruning of repeated
  slices and frames, with compaction (the padded form never synchronises with a GPU).

Pure-PyTorch references live in :mod:`omnivmed_ext.reference`; position helpers in
:mod:`omnivmed_ext.positions`.
"""

from ._library import built_with_cuda, cuda_archs, library_loaded
from .attention import rope_attention
from .positions import (
    ItemGrid,
    PackedPositions,
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    frame_positions,
    grid_positions,
    lengths_from_cu_seqlens,
    packed_positions,
)
from .prune import PaddedPruneResult, PruneResult, l1_prune, l1_prune_padded
from .rope import rope_nd

__all__ = [
    "ItemGrid",
    "PackedPositions",
    "PaddedPruneResult",
    "PruneResult",
    "built_with_cuda",
    "check_cu_seqlens",
    "cu_seqlens_from_lengths",
    "cuda_archs",
    "frame_positions",
    "grid_positions",
    "l1_prune",
    "l1_prune_padded",
    "lengths_from_cu_seqlens",
    "library_loaded",
    "packed_positions",
    "rope_attention",
    "rope_nd",
]
