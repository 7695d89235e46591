"""`rope_attention`: bidirectional attention inside each packed item, with `rope_nd`
applied to q and k.

Ops, one owner each:

- `rope_attention` -> out: `rope_attention_forward`'s first output (CompositeImplicitAutograd,
  C++).
- `rope_attention_forward` -> (out, lse [H, L] fp32) and `rope_attention_backward`, which
  reads out and lse: schemas and both kernels in C++ (csrc/registration.cpp,
  csrc/attention/). CPU: `rope_nd`, then PyTorch's flash attention for CPU item by item
  (it returns the log-sum-exp), and its backward with the inverse rotation on dq and dk.
  CUDA: the fused kernels.
- `_rope_attention_fused_forward` / `_backward`: the fused CUDA kernels under their own
  names (float16 and bfloat16; flash-attention-2 schedule, rotation applied to tiles on
  the fly, nothing read on the host, so they are sync-free and CUDA-graph safe).
- `_rope_attention_flash_forward` / `_backward` and `_rope_attention_composite_forward` /
  `_backward`: the CUDA backends written in Python (they only call torch ops), declared and
  implemented here, CUDA only.

This module adds what Python owns, as pytorch/extension-cpp does: fake kernels, and the
autograd of `rope_attention_forward`, registered on its Autograd key. That autograd kernel
is also where the CUDA backend is chosen, per call: the forward runs the op of
:func:`cuda_path` (the C++ op's own kernel on the CPU) and its backward the backward op of
that same path. Under ``torch.inference_mode`` the Autograd key is skipped, so a direct
call of the op takes the C++ kernel (fused on CUDA); :func:`rope_attention` chooses the
backend itself there. Direct calls of `rope_attention_backward` choose by
:func:`cuda_path` too.

CUDA backends, chosen by :func:`set_cuda_backend` or the environment variable
``OMNIVMED_ROPE_ATTENTION_CUDA``:

- ``flash`` (the default): `rope_nd`, then `torch.nn.attention.varlen.varlen_attn` over
  the whole pack in one call, forward and backward. It was the fastest kernel measured on
  an H200 at the vision tower's shapes (9x the per-item composite on 64 images of 729
  tokens; the fused kernel runs at 0.32-0.50x of it). One exception, decided per call
  from shapes alone (no device value is read, so no host synchronisation): a pack of one
  item (`cu_seqlens` has two entries) of at least :data:`LONG_ITEM_TOKENS` tokens goes to
  the memory-efficient SDPA kernel on that item instead, which was faster than
  `varlen_attn` there (a 32,768-token clip). A long item packed with others stays on
  `varlen_attn`: splitting the pack would need its offsets on the host.
  :func:`flash_path` is the rule.
- ``fused``: the one-kernel forward and backward.
- ``composite``: `rope_nd` + memory-efficient SDPA per item, the backward written out as
  chunked matmuls; reads `cu_seqlens` on the host.

float32 always takes the composite. The backward always runs on the path its forward
took, whatever is selected by then.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import os
from collections.abc import Iterator, Sequence

import torch

from ._library import library_loaded, require_library
from .rope import check_rope_nd_args

SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
CUDA_BACKENDS = ("flash", "composite", "fused")
DEFAULT_CUDA_BACKEND = "flash"
# A single item at least this long takes SDPA instead of varlen_attn under the flash
# backend (on an H200: 32,768 tokens at head dim 72, 15.6 vs 21.0 ms forward; varlen_attn
# wins at 8,192 and below).
LONG_ITEM_TOKENS = 16384
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED_DTYPES = (torch.float16, torch.bfloat16)


def _backend_from_env() -> str:
    name = os.environ.get("OMNIVMED_ROPE_ATTENTION_CUDA", DEFAULT_CUDA_BACKEND).strip().lower()
    if name not in CUDA_BACKENDS:
        raise ValueError(
            f"OMNIVMED_ROPE_ATTENTION_CUDA must be one of {CUDA_BACKENDS}, got {name!r}"
        )
    return name


_cuda_backend = _backend_from_env()


def cuda_backend() -> str:
    """The CUDA implementation `rope_attention` uses for float16/bfloat16."""
    return _cuda_backend


def set_cuda_backend(name: str) -> None:
    """Select the CUDA implementation: ``"flash"`` (`rope_nd` + torch's varlen flash
    attention, the default), ``"fused"`` (one kernel, sync-free) or ``"composite"``
    (`rope_nd` + SDPA per item)."""
    global _cuda_backend
    if name not in CUDA_BACKENDS:
        raise ValueError(
            f"rope_attention: CUDA backend must be one of {CUDA_BACKENDS}, got {name!r}"
        )
    _cuda_backend = name


@contextlib.contextmanager
def use_cuda_backend(name: str) -> Iterator[None]:
    """`set_cuda_backend` for the duration of a ``with`` block."""
    previous = cuda_backend()
    set_cuda_backend(name)
    try:
        yield
    finally:
        set_cuda_backend(previous)


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


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> list[int]:
    """The item offsets as a list, after checking they start at 0, never decrease, end at
    `total` and hold no item longer than `max_seqlen` (reads them: a sync on a GPU)."""
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
    *,
    check_seqlens: bool = True,
) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale) v inside each item of `cu_seqlens`, none across.

    Args:
        q, k, v: `[L, H, D]`, float32/float16/bfloat16, D in 64/72/80/96/128.
        positions: `[L, A]` int32/int64 positions for `rope_nd` (e.g. t, h, w).
        cu_seqlens: int32 `[B+1]` item offsets; `max_seqlen` at least the longest item
            (an upper bound is fine).
        sections, theta: `rope_nd`'s.
        softmax_scale: default 1/sqrt(D).
        check_seqlens: validate `cu_seqlens` against L and `max_seqlen` on the host (one
            device synchronisation on a GPU). Pass False in a loop over layers once the
            pack has been checked, to keep the fused CUDA path free of host syncs. Skipped
            inside torch.compile (the composite kernels still check).
    """
    sections = [int(s) for s in sections]
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, float(theta))
    require_library("rope_attention", q.device)
    if check_seqlens and not torch.compiler.is_compiling():
        validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    args = (q, k, v, positions, cu_seqlens, int(max_seqlen), sections, float(theta), softmax_scale)
    if q.is_cuda and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        # Inference mode skips the Autograd key, where the backend is chosen: choose here.
        return _forward_op_for(_path(q, cu_seqlens))(*args)[0]
    return torch.ops.omnivmed.rope_attention.default(*args)


def flash_path(num_items: int, total: int) -> str:
    """The flash backend's kernel for a pack of `num_items` items and `total` tokens:
    ``"sdpa"`` (memory-efficient SDPA on the one item) when the pack is a single item of
    at least :data:`LONG_ITEM_TOKENS` tokens, else ``"varlen"`` (`varlen_attn` over the
    pack). Shapes only, so deciding costs no host synchronisation."""
    return "sdpa" if num_items == 1 and total >= LONG_ITEM_TOKENS else "varlen"


def cuda_path(q: torch.Tensor, cu_seqlens: torch.Tensor) -> str:
    """The implementation a CUDA call with these inputs takes under the selected backend:
    ``"composite"``, ``"fused"``, ``"varlen"`` or ``"sdpa"`` (dtype and shapes only)."""
    if q.dtype not in _FUSED_DTYPES or _cuda_backend == "composite":
        return "composite"
    if _cuda_backend == "fused":
        return "fused"
    return flash_path(cu_seqlens.shape[0] - 1, q.shape[0])


def _path(q: torch.Tensor, cu_seqlens: torch.Tensor) -> str:
    return cuda_path(q, cu_seqlens) if q.is_cuda else "cpu"


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # [l, H, D] -> [1, H, l, D] (a view)
    return x.transpose(0, 1).unsqueeze(0)


def _rotate(x, positions, sections, theta, inverse=False):
    return torch.ops.omnivmed.rope_nd(x, positions, sections, float(theta), inverse)


def _forward_per_item(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale,
                      attend_item):  # fmt: skip
    # rope_nd, then one attention call per item: attend_item(rq, rk, v, scale) on
    # [1, H, l, D] views returns (out [1, H, l, D], lse [1, H, >= l]).
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta)
    bounds = validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    rq, rk = (_rotate(x, positions, sections, theta) for x in (q, k))
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    scale = _scale(q, softmax_scale)
    for a, b in itertools.pairwise(bounds):
        if b > a:
            o, item_lse = attend_item(*(_heads_first(x[a:b]) for x in (rq, rk, v)), scale)
            out[a:b] = o[0].transpose(0, 1)
            lse[:, a:b] = item_lse[0, :, : b - a]
    return out, lse


def _cpu_flash_item(rq, rk, v, scale):
    # One item through torch's CPU flash attention, the call the C++ CPU kernel makes (the
    # tests' CPU stand-ins for the flash backend's kernels are built on it).
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        rq, rk, v, 0.0, False, scale=scale
    )


def _cuda_efficient_item(rq, rk, v, scale):
    # Its log-sum-exp rows are padded to a multiple of 32 (sliced off by the caller).
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        rq, rk, v, None, True, scale=scale
    )
    return out, lse


# Scores held at once by the composite backward: 2**26 float32 values (256 MiB), so a
# 32,768-token item is done in query chunks instead of one [H, L, L] matrix.
_COMPOSITE_SCORES = 2**26


def _backward_composite(
    grad, q, k, v, out, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):
    """The attention backward written out as matmuls, item by item and in query chunks,
    recomputing the probabilities from q and k: matmul operands in the input dtype
    (tensor cores for fp16/bf16, as flash-attention's backward does), softmax and every
    sum in float32. No autograd runs inside it, so it behaves the same under any dispatch
    mode (opcheck, torch.compile, no_grad)."""
    bounds = validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    rq, rk = (_rotate(x, positions, sections, theta) for x in (q, k))
    scale = _scale(q, softmax_scale)
    dtype = q.dtype
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    heads = q.shape[1]
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        # [H, l, D] views of this item
        qi, ki, vi, gi = (x[a:b].transpose(0, 1) for x in (rq, rk, v, grad))
        oi = out[a:b].transpose(0, 1)
        dk_i, dv_i = dk[a:b].transpose(0, 1), dv[a:b].transpose(0, 1)
        chunk = max(1, _COMPOSITE_SCORES // (heads * (b - a)))
        for c in range(0, b - a, chunk):
            qc, gc, oc = qi[:, c : c + chunk], gi[:, c : c + chunk], oi[:, c : c + chunk]
            p = torch.softmax((qc @ ki.transpose(1, 2)).float() * scale, dim=-1)  # [H, c, l]
            dv_i += (p.to(dtype).transpose(1, 2) @ gc).float()
            dp = (gc @ vi.transpose(1, 2)).float()
            ds = p * (dp - (gc.float() * oc.float()).sum(-1, keepdim=True))
            ds_low = ds.to(dtype)
            dq[a + c : a + c + qc.shape[1]] = ((ds_low @ ki).float() * scale).transpose(0, 1)
            dk_i += (ds_low.transpose(1, 2) @ qc).float() * scale
    # dq, dk above are with respect to the rotated q, k: turn them back.
    return (
        _rotate(dq, positions, sections, theta, True).to(q.dtype),
        _rotate(dk, positions, sections, theta, True).to(k.dtype),
        dv.to(v.dtype),
    )


def _composite_forward(
    q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):  # fmt: skip
    return _forward_per_item(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta,
                             softmax_scale, _cuda_efficient_item)  # fmt: skip


def _composite_backward_kernel(
    grad, q, k, v, out, lse, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):
    # The composite recomputes the probabilities, so it needs no log-sum-exp.
    return _backward_composite(
        grad, q, k, v, out, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
    )


def _forward_fake(
    q, k, v, positions, cu_seqlens, max_seqlen, sections, theta=10000.0, softmax_scale=None
):
    check_rope_attention_args(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta)
    out = q.new_empty(q.shape)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _backward_fake(
    grad, q, k, v, out, lse, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --- the flash backend: rope_nd + torch's varlen flash attention --------------------------

_FLASH_PATHS = ("varlen", "sdpa")


@functools.cache
def _varlen_entry_points():
    """torch's `varlen_attn` and its backward op, checked once against this torch's
    signatures (they differ between releases; only the arguments used here must exist)."""
    from torch.nn.attention import varlen

    params = inspect.signature(varlen.varlen_attn).parameters
    if "return_aux" not in params or "scale" not in params:
        raise RuntimeError(
            "rope_attention: the flash backend needs torch.nn.attention.varlen.varlen_attn "
            f"with return_aux and scale (torch {torch.__version__} has {list(params)}); "
            "select the 'fused' or 'composite' backend"
        )
    backward = torch.ops.torch_attn._varlen_attn_backward.default
    names = [a.name for a in backward._schema.arguments]
    required = {a.name for a in backward._schema.arguments if not a.has_default_value()}
    unknown = required - set(_VARLEN_BACKWARD_ARGS)
    if unknown:
        raise RuntimeError(
            f"rope_attention: torch {torch.__version__}'s varlen attention backward needs "
            f"arguments {sorted(unknown)} that the flash backend does not know"
        )
    return varlen.varlen_attn, varlen.AuxRequest(lse=True), backward, names


# Every argument torch's varlen backward has had, by name (values filled per call).
_VARLEN_BACKWARD_ARGS = (
    "grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q",
    "max_k", "is_causal", "rng_state", "scale", "window_size",
)  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The flash kernels take any row stride but need unit stride along D.
    return x if x.stride(-1) == 1 else x.contiguous()


def _varlen_forward(rq, rk, v, cu_seqlens, max_seqlen, scale):
    """(out [L, H, D], lse [H, L] fp32) of `varlen_attn` over the pack."""
    varlen_attn, aux, _, _ = _varlen_entry_points()
    out, lse = varlen_attn(rq, rk, _last_dim_contiguous(v), cu_seqlens, cu_seqlens,
                           max_seqlen, max_seqlen, return_aux=aux, scale=scale)  # fmt: skip
    if lse.shape != (rq.shape[1], rq.shape[0]):
        raise RuntimeError(
            f"rope_attention: varlen_attn returned a log-sum-exp of shape {tuple(lse.shape)}, "
            f"expected [H, L] = {[rq.shape[1], rq.shape[0]]}; select another backend"
        )
    return out, lse


def _varlen_backward(grad, rq, rk, v, out, lse, cu_seqlens, max_seqlen, scale):
    _, _, backward, names = _varlen_entry_points()
    values = {
        "grad_out": grad, "query": rq, "key": rk, "value": _last_dim_contiguous(v), "out": out,
        "lse": lse, "cu_seq_q": cu_seqlens, "cu_seq_k": cu_seqlens, "max_q": max_seqlen,
        "max_k": max_seqlen, "is_causal": False, "scale": scale, "window_size": [-1, -1],
        # No dropout, so the generator state is never read (torch passes zeros too).
        "rng_state": torch.zeros(2, dtype=torch.uint64, device=rq.device),
    }  # fmt: skip
    return backward(**{name: values[name] for name in names if name in values})


def _sdpa_forward(rq, rk, v, scale):
    """The one-item pack through the memory-efficient SDPA kernel ([1, L, H, D] views)."""
    out, lse = torch.ops.aten._efficient_attention_forward(
        rq[None], rk[None], _last_dim_contiguous(v)[None], None, None, None, None, None, 0.0, 0,
        True, scale=scale,
    )[:2]  # fmt: skip
    # Its log-sum-exp rows are padded to a multiple of 32: keep [H, L].
    return out[0], lse[0, :, : rq.shape[0]].contiguous()


def _sdpa_backward(grad, rq, rk, v, out, lse, scale):
    length, heads = rq.shape[0], rq.shape[1]
    padded = lse.new_zeros((1, heads, -(-length // 32) * 32))
    padded[0, :, :length] = lse
    seed = torch.zeros((), dtype=torch.int64, device=rq.device)  # unused without dropout
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        grad[None], rq[None], rk[None], _last_dim_contiguous(v)[None], None, out[None], None,
        None, length, length, padded, 0.0, seed, seed, 0, False, scale=scale,
    )  # fmt: skip
    return dq[0], dk[0], dv[0]


def _flash_forward(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale):
    rq, rk = (_rotate(x, positions, sections, theta) for x in (q, k))
    scale = _scale(q, softmax_scale)
    if q.shape[0] == 0:
        return torch.zeros_like(q), q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    if flash_path(cu_seqlens.shape[0] - 1, q.shape[0]) == "sdpa":
        return _sdpa_forward(rq, rk, v, scale)
    return _varlen_forward(rq, rk, v, cu_seqlens, max_seqlen, scale)


def _flash_backward(grad, q, k, v, out, lse, positions, cu_seqlens, max_seqlen, sections, theta,
                    softmax_scale):  # fmt: skip
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rq, rk = (_rotate(x, positions, sections, theta) for x in (q, k))
    scale = _scale(q, softmax_scale)
    grad = grad.contiguous()
    if flash_path(cu_seqlens.shape[0] - 1, q.shape[0]) == "sdpa":
        dq, dk, dv = _sdpa_backward(grad, rq, rk, v, out, lse, scale)
    else:
        dq, dk, dv = _varlen_backward(grad, rq, rk, v, out, lse, cu_seqlens, max_seqlen, scale)
    # dq, dk above are with respect to the rotated q, k: turn them back.
    return (
        _rotate(dq, positions, sections, theta, True),
        _rotate(dk, positions, sections, theta, True),
        dv.contiguous(),
    )


# --- per-call dispatch and autograd -----------------------------------------------------


def _forward_op_for(path: str):
    """The forward op of a path; "cpu" is the C++ op's own CPU kernel, so it must be called
    below the Autograd key (where this choice is made)."""
    if path == "cpu":
        return torch.ops.omnivmed.rope_attention_forward.default
    if path == "fused":
        return torch.ops.omnivmed._rope_attention_fused_forward.default
    if path in _FLASH_PATHS:
        return torch.ops.omnivmed._rope_attention_flash_forward.default
    return torch.ops.omnivmed._rope_attention_composite_forward.default


def _backward_op_for(path: str):
    if path == "cpu":
        return torch.ops.omnivmed.rope_attention_backward.default
    if path == "fused":
        return torch.ops.omnivmed._rope_attention_fused_backward.default
    if path in _FLASH_PATHS:
        return torch.ops.omnivmed._rope_attention_flash_backward.default
    return torch.ops.omnivmed._rope_attention_composite_backward.default


class _RopeAttentionFunction(torch.autograd.Function):
    """rope_attention_forward on one path, and the backward op of that same path."""

    @staticmethod
    def forward(ctx, path, q, k, v, positions, cu_seqlens, max_seqlen, sections, theta,
                softmax_scale):  # fmt: skip
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = _forward_op_for(path)(
                q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale
            )
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, positions, cu_seqlens)
        # The backward takes the path the forward took, whatever backend is selected by the
        # time backward runs.
        ctx.path = path
        ctx.args = (max_seqlen, list(sections), theta, softmax_scale)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        q, k, v, out, lse, positions, cu_seqlens = ctx.saved_tensors
        max_seqlen, sections, theta, scale = ctx.args
        with torch._C._AutoDispatchBelowAutograd():
            dq, dk, dv = _backward_op_for(ctx.path)(
                grad.contiguous(), q, k, v, out, lse, positions, cu_seqlens, max_seqlen,
                sections, theta, scale,
            )  # fmt: skip
        return None, dq, dk, dv, None, None, None, None, None, None


def _forward_autograd(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta=10000.0,
                      softmax_scale=None):  # fmt: skip
    # rope_attention_forward's Autograd kernel (the dispatcher drops arguments equal to
    # their defaults, hence the defaults here).
    path = _path(q, cu_seqlens)
    args = (q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _RopeAttentionFunction.apply(path, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return _forward_op_for(path)(*args)


def _backward_autograd(grad, q, k, v, out, lse, positions, cu_seqlens, max_seqlen, sections,
                       theta, softmax_scale):  # fmt: skip
    # rope_attention_backward's Autograd kernel: a direct call takes the backward of the
    # path a forward with these inputs would take.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad, q, k, v, out)):
        raise RuntimeError(
            "omnivmed::rope_attention_backward is not differentiable (rope_attention has no "
            "double backward); call it under torch.no_grad() or on tensors that do not "
            "require grad"
        )
    with torch._C._AutoDispatchBelowAutograd():
        return _backward_op_for(_path(q, cu_seqlens))(
            grad, q, k, v, out, lse, positions, cu_seqlens, max_seqlen, sections, theta,
            softmax_scale,
        )  # fmt: skip


# Ops of this namespace with no CPU kernel: the CUDA backends (fused in C++, flash and
# composite declared below). Every other op has a CPU kernel in the C++ library.
CUDA_ONLY_OPS = (
    "_rope_attention_fused_forward",
    "_rope_attention_fused_backward",
    "_rope_attention_flash_forward",
    "_rope_attention_flash_backward",
    "_rope_attention_composite_forward",
    "_rope_attention_composite_backward",
)
_FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cu_seqlens, int max_seqlen, "
    "int[] sections, float theta, float? softmax_scale) -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor positions, "
    "Tensor cu_seqlens, int max_seqlen, int[] sections, float theta, float? softmax_scale) "
    "-> (Tensor, Tensor, Tensor)"
)


def _register():
    # Held in a module global: the definitions live as long as the library object.
    lib = torch.library.Library("omnivmed", "FRAGMENT")
    for name, forward, backward in (
        ("flash", _flash_forward, _flash_backward),
        ("composite", _composite_forward, _composite_backward_kernel),
    ):
        for kind, kernel, fake, schema in (
            ("forward", forward, _forward_fake, _FORWARD_SCHEMA),
            ("backward", backward, _backward_fake, _BACKWARD_SCHEMA),
        ):
            op = f"_rope_attention_{name}_{kind}"
            lib.define(op + schema)
            lib.impl(op, kernel, "CUDA")
            torch.library.register_fake(f"omnivmed::{op}", fake, lib=lib)
    for op in ("_rope_attention_fused_forward", "rope_attention_forward"):
        torch.library.register_fake(f"omnivmed::{op}", _forward_fake, lib=lib)
    for op in ("_rope_attention_fused_backward", "rope_attention_backward"):
        torch.library.register_fake(f"omnivmed::{op}", _backward_fake, lib=lib)
    lib.impl("rope_attention_forward", _forward_autograd, "Autograd")
    lib.impl("rope_attention_backward", _backward_autograd, "Autograd")
    return lib


if library_loaded():
    _library = _register()
