"""Conversations -> token ids and labels, through the tokenizer's chat template.

Each visual item is marked once in a human turn (`<image>`, `<video>` or MedM-VL's
`<image3d>`), wherever it stands; the marker is expanded to exactly as many placeholder
tokens as the item gives visual tokens. Labels are -100 except on the assistant's
answers (and their end-of-turn token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

MARKERS = ("<image3d>", "<image>", "<video>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IGNORE_INDEX = -100


class ConversationError(ValueError):
    pass


def count_markers(text: str) -> int:
    return len(_MARKER_RE.findall(text))


def to_messages(conversations: Sequence[dict], sample_id: str = "?") -> list[dict[str, str]]:
    """LLaVA's [{"from", "value"}] (or chat-style {"role", "content"}) -> chat messages."""
    if not conversations:
        raise ConversationError(f"sample {sample_id!r}: the conversation is empty")
    messages = []
    for i, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLES or not isinstance(text, str):
            raise ConversationError(
                f"sample {sample_id!r}: turn {i} needs 'from' in {sorted(_ROLES)} and a string 'value', got {turn}"
            )
        messages.append({"role": _ROLES[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(
            f"sample {sample_id!r}: the conversation has no answer (no 'gpt' turn)"
        )
    return messages


def expand_markers(messages: list[dict[str, str]], token_counts: Sequence[int], image_token: str,
                   sample_id: str = "?") -> list[dict[str, str]]:  # fmt: skip
    """Replace the i-th marker by token_counts[i] placeholders; the counts must match."""
    found = sum(count_markers(m["content"]) for m in messages)
    if found != len(token_counts):
        raise ConversationError(
            f"sample {sample_id!r}: the conversation has {found} visual markers but the sample "
            f"has {len(token_counts)} visual items"
        )
    counts = iter(token_counts)
    out = []
    for m in messages:
        if m["role"] != "user" and count_markers(m["content"]):
            raise ConversationError(
                f"sample {sample_id!r}: visual markers are allowed in human turns only"
            )
        out.append(
            {**m, "content": _MARKER_RE.sub(lambda _: image_token * next(counts), m["content"])}
        )
    return out


def tokenize_conversation(
    tokenizer, messages: list[dict[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for a whole conversation; labels keep only the answers."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:k], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ConversationError("the chat template does not render turns incrementally")
        spans.append((len(prefix), len(upto.rstrip("\n"))))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a >= s and b <= e and b > a for s, e in spans):
            labels[i] = ids[i]
    return ids, labels
