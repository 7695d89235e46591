"""Prompts for generation, shared by omnivmed-infer, omnivmed-eval and omnivmed-serve:
a chat with one marker per medium -> token ids, and prompts left-padded into a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..processing.prompt import expand_markers


def prompt_ids(tokenizer, messages: list[dict[str, str]], token_counts: Sequence[int], image_token: str,
               sample_id: str = "?") -> torch.Tensor:  # fmt: skip
    """`[L]` ids of the chat (markers replaced by their visual placeholders), ending with
    the template's generation prompt."""
    chat = expand_markers(messages, list(token_counts), image_token, sample_id)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids `[B, L]`, attention mask) with every prompt ending at the last column, so the
    generated tokens of all rows start at column L."""
    longest = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - p.numel() :], mask[i, longest - p.numel() :] = p, 1
    return ids, mask
