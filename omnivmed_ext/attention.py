"""`rope_attention`: bidirectional attention inside each packed item, with `rope_nd`
applied to q and k.

The kernels registered here compose `rope_nd` with PyTorch's scaled-dot-product attention
item by item (flash or memory-efficient SDPA kernels on a GPU). They are the CPU path and,
until the fused CUDA kernel lands, the CUDA path too; both read `cu_seqlens` on the host.
The backward recomputes the forward under autograd.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._library import library_loaded, require_library
from .rope import check_rope_nd_args

SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta) -> None:
    """Shapes, dtypes and devices (no tensor values are read)."""
    if q.dim() != 3:
        raise ValueError(f"rope_attention: q must be [L, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"rope_attention: q, k and v must have the same shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"rope_attention: q, k, v must share one dtype of float32/float16/bfloat16, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"rope_attention: head dim {q.shape[2]} is not supported; supported: {SUPPORTED_HEAD_DIMS}"
        )
    if len({t.device for t in (q, k, v, positions, cu_seqlens)}) != 1:
        raise ValueError("rope_attention: q, k, v, positions and cu_seqlens must be on one device")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"rope_attention: cu_seqlens must be int32 [B+1] with B >= 1, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if max_seqlen < 0:
        raise ValueError(f"rope_attention: max_seqlen must be >= 0, got {max_seqlen}")
    check_rope_nd_args(q, positions, sections, theta)


def _check_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> list[int]:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            f"rope_attention: cu_seqlens must start at 0, never decrease and end at L = {total}, "
            f"got {bounds if len(bounds) <= 12 else [*bounds[:6], '...', *bounds[-3:]]}"
        )
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    if longest > max_seqlen:
        raise ValueError(
            f"rope_attention: an item has {longest} tokens but max_seqlen = {max_seqlen}"
        )
    return bounds


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sections: Sequence[int],
    theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale) v inside each item of `cu_seqlens`, none across.

    Args:
        q, k, v: `[L, H, D]`, float32/float16/bfloat16, D in 64/72/80/96/128.
        positions: `[L, A]` int32/int64 positions for `rope_nd` (e.g. t, h, w).
        cu_seqlens: int32 `[B+1]` item offsets; `max_seqlen` at least the longest item.
        sections, theta: `rope_nd`'s.
        softmax_scale: default 1/sqrt(D).
    """
    sections = [int(s) for s in sections]
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, float(theta))
    require_library("rope_attention", q.device)
    return torch.ops.omnivmed.rope_attention.default(
        q, k, v, positions, cu_seqlens, int(max_seqlen), sections, float(theta), softmax_scale
    )


def _kernel(
    q, k, v, positions, cu_seqlens, max_seqlen, sections, theta=10000.0, softmax_scale=None
):
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta)
    return _attend(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale)


def _fake(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta=10000.0, softmax_scale=None):
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta)
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, positions, cu_seqlens)
    ctx.args = (max_seqlen, list(sections), theta, softmax_scale)


def _backward(ctx, grad):
    q, k, v, positions, cu_seqlens = ctx.saved_tensors
    max_seqlen, sections, theta, scale = ctx.args
    dq, dk, dv = torch.ops.omnivmed.rope_attention_backward.default(
        grad, q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, scale
    )
    return dq, dk, dv, None, None, None, None, None, None


def _backward_kernel(
    grad, q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):
    # Recompute the forward through differentiable pieces and differentiate it.
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = _attend(qq, kk, vv, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _backward_fake(
    grad, q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attend(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, scale):
    # rope_nd, then SDPA item by item. The pieces are differentiable (rope_nd has its own
    # autograd), so the backward kernel recomputes through this same function.
    bounds = _check_values(cu_seqlens, q.shape[0], max_seqlen)
    rq = torch.ops.omnivmed.rope_nd(q, positions, sections, float(theta), False)
    rk = torch.ops.omnivmed.rope_nd(k, positions, sections, float(theta), False)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = [
        F.scaled_dot_product_attention(
            rq[a:b].transpose(0, 1).unsqueeze(0), rk[a:b].transpose(0, 1).unsqueeze(0),
            v[a:b].transpose(0, 1).unsqueeze(0), scale=scale,
        ).squeeze(0).transpose(0, 1)
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]  # fmt: skip
    return torch.cat(outs) if outs else torch.zeros_like(q)


if library_loaded():
    torch.library.register_kernel("omnivmed::rope_attention", ("cpu", "cuda"))(_kernel)
    torch.library.register_fake("omnivmed::rope_attention")(_fake)
    torch.library.register_autograd(
        "omnivmed::rope_attention", _backward, setup_context=_setup_context
    )
    torch.library.register_kernel("omnivmed::rope_attention_backward", ("cpu", "cuda"))(
        _backward_kernel
    )
    torch.library.register_fake("omnivmed::rope_attention_backward")(_backward_fake)
