"""The LLM's training loss without its logits.

At a 151,936-token vocabulary the `[tokens, vocab]` logits of a long packed row, and
their gradient, are gigabytes. On CUDA, with the optional `liger-kernel` package
(`pip install omnivmed[gpu]`), the loss is computed from the last hidden states and the
output embedding in chunks (liger's fused linear cross-entropy), so the logits never
exist whole. Elsewhere the LLM computes its usual loss. Both are the mean cross-entropy
of each token predicting the next, over the labels that are not `IGNORE_INDEX`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# The label that counts for nothing: transformers' loss and the prompt builder agree on it.
IGNORE_INDEX = -100
_enabled = True


@contextlib.contextmanager
def fused_cross_entropy(enabled: bool) -> Iterator[None]:
    """Within the block, use (or not) the fused loss where it is available (for
    benchmarks and tests comparing the two)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def fused_cross_entropy_applies(device: torch.device) -> bool:
    """Whether the fused loss runs for hidden states on `device`."""
    return (
        _enabled and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    )


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next token's label (`IGNORE_INDEX` after the last)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` (`[..., H]` x `[V, H]`) without
    forming it whole."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    flat = hidden.reshape(-1, hidden.shape[-1])
    return liger_fused_linear_cross_entropy(
        flat, weight, shifted_labels(labels).to(flat.device), ignore_index=IGNORE_INDEX
    )


def plain_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The same loss with the logits formed (in fp32, as transformers' loss upcasts)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    return F.cross_entropy(
        logits, shifted_labels(labels).to(logits.device), ignore_index=IGNORE_INDEX
    )
