"""The LLM's attention on packed rows: torch's variable-length flash attention.

The collator can pack several samples into one row, their `position_ids` restarting at 0
at every sample. Registered with transformers' `AttentionInterface` as `VARLEN`, this
function finds the samples from the position ids (once per forward: the offsets are
cached on the position-id tensor that every layer receives) and runs causal attention
inside each with `torch.nn.attention.varlen.varlen_attn`, so no `[T, T]` mask is built
and no padding is computed.

`varlen_attn` runs on CUDA in fp16/bf16 only: elsewhere, and wherever a padding mask or a KV cache
makes rows unequal (batched generation), the same name computes exactly what transformers'
SDPA path computes. `default_llm_attention()` picks the implementation new models get.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "omnivmed_varlen"


def varlen_supported(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether `varlen_attn` runs for this device and dtype: its flash kernels are CUDA-only
    and take fp16/bf16 (an fp32 model on CUDA keeps SDPA)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def default_llm_attention() -> str:
    """The LLM attention new models get: flash-attn's kernels where that package is
    installed on a CUDA machine, else the varlen function on CUDA, SDPA on the CPU."""
    if not torch.cuda.is_available():
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN


# ---- offsets from position ids, once per forward ------------------------------------------
_last: tuple[Any, int, int, tuple[torch.Tensor, int]] | None = None


def packed_offsets(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32) and the longest sample of `rows` rows flattened into one,
    where a sample starts at each row start and wherever the position does not follow
    its predecessor. The result is cached for this exact tensor (same object, unmodified,
    same row count), so only the first layer of a forward pays the host syncs."""
    global _last
    if (
        _last is not None
        and _last[0]() is position_ids
        and _last[1] == position_ids._version
        and _last[2] == rows
    ):
        return _last[3]
    pos = position_ids.expand(rows, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.tensor([pos.numel()], device=flat.device, dtype=flat.dtype)
    cu = torch.cat((flat, total)).to(torch.int32)
    result = (cu, int(torch.diff(cu).max()))
    _last = (weakref.ref(position_ids), position_ids._version, rows, result)
    return result


# ---- the kernel call, across torch versions ------------------------------------------------
@functools.cache
def _kernel_options(fn: Any) -> tuple[dict[str, Any], bool]:
    """Causality and GQA as this torch's `varlen_attn` spells them: newer releases take a
    `window_size` (`(-1, 0)` is causal) and `enable_gqa`; older ones an `is_causal` flag
    and equal head counts only."""
    params = inspect.signature(fn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def _varlen_causal(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """q `[T, Hq, D]`, k and v `[T, Hkv, D]` -> `[T, Hq, D]`, causal inside each sample."""
    from torch.nn.attention import varlen

    fn = varlen.varlen_attn
    causal, gqa = _kernel_options(fn)
    extra: dict[str, Any] = dict(causal, scale=scale)
    if k.shape[1] != q.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:  # each key/value head serves a consecutive group of query heads
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **extra)


# ---- what transformers calls ---------------------------------------------------------------
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q `[B, Hq, S, D]`, k and v
    `[B, Hkv, S, D]` -> `([B, S, Hq, D], None)`."""
    rows, _, length, dim = query.shape
    unpadded = attention_mask is None and key.shape[2] == length
    if not (unpadded and varlen_supported(query.device, query.dtype)):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout > 0.0 or sliding_window is not None:
        raise NotImplementedError(
            f"the {VARLEN!r} LLM attention has no attention dropout or sliding window "
            f"(dropout {dropout}, sliding_window {sliding_window}); use attn_implementation='sdpa'"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).unsqueeze(0)
    cu, max_len = packed_offsets(position_ids, rows)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)

    out = _varlen_causal(flat(query), flat(key), flat(value), cu, max_len, scaling)
    return out.view(rows, length, -1, dim), None


def varlen_mask(
    *args: Any, attention_mask: torch.Tensor | None = None, device="cpu", **kwargs: Any
) -> torch.Tensor | None:
    """No mask where the varlen kernel runs on unpadded rows without a cache offset (the
    samples come from the position ids); SDPA's mask wherever the SDPA path runs."""
    square = kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset")
    if (
        varlen_supported(torch.device(device), kwargs.get("dtype"))
        and square
        and (attention_mask is None or bool(attention_mask.all()))
    ):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, device=device, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)
