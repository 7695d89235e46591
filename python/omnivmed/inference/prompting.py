"""Prompts for generation, shared by omnivmed-infer, omnivmed-eval and omnivmed-serve:
a chat with one marker per medium -> token ids, and prompts left-padded into a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..processing.prompt import expand_markers, tokenize_conversation


def prompt_ids(tokenizer, messages: list[dict[str, str]], token_counts: Sequence[int], image_token: str,
               sample_id: str | None = None) -> torch.Tensor:  # fmt: skip
    """`[L]` ids of the chat (markers replaced by their visual placeholders), ending with
    the template's generation prompt. The messages' text never becomes special tokens:
    only the template's own text and the placeholders do (as in training)."""
    chat = expand_markers(messages, list(token_counts), image_token, sample_id)
    ids, _ = tokenize_conversation(tokenizer, chat, image_token, add_generation_prompt=True)
    return ids


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids `[B, L]`, attention mask) with every prompt ending at the last column, so the
    generated tokens of all rows start at column L."""
    longest = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - p.numel() :], mask[i, longest - p.numel() :] = p, 1
    return ids, mask
