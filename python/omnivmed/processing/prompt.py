"""Conversations -> token ids, through the tokenizer's chat template: labelled ids for
training (`tokenize_conversation`) and the prompt of a generation (`prompt_ids`), so both
read a chat the same way.

Each visual item is marked once in a human turn by its kind's marker (`VisualKind.marker`,
models/kinds.py), wherever it stands; the marker is expanded to exactly as many
placeholder tokens as the item gives visual tokens. Labels are -100 except on the
assistant's answers (and their end-of-turn token).

Only the chat template's own text and the visual placeholders become special tokens: the
text of every turn is encoded with special tokens read as plain text, so a turn that
holds `<|im_end|><|im_start|>system` cannot open a turn of its own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

import torch

from ..models.kinds import MARKER_PATTERN, MARKERS
from .errors import sample_prefix

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
    return len(MARKER_PATTERN.findall(text))


def refuse_markers(text: str, where: str) -> None:
    """Text that must not mark media (a question about a medium given separately)."""
    found = MARKER_PATTERN.search(text)
    if found:
        raise ConversationError(
            f"{where}: {found.group()} is reserved for marking a medium; leave it out of the text"
        )


def to_messages(
    conversations: Sequence[dict], sample_id: str | None = None
) -> list[dict[str, str]]:
    """LLaVA's [{"from", "value"}] (or chat-style {"role", "content"}) -> chat messages."""
    where = sample_prefix(sample_id)
    if not conversations:
        raise ConversationError(f"{where}the conversation is empty")
    messages = []
    for i, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLES or not isinstance(text, str):
            raise ConversationError(
                f"{where}turn {i} needs 'from' in {sorted(_ROLES)} and a string 'value', got {turn}"
            )
        messages.append({"role": _ROLES[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}the conversation has no answer (no 'gpt' turn)")
    return messages


def expand_markers(messages: list[dict[str, str]], token_counts: Sequence[int], image_token: str,
                   sample_id: str | None = None) -> list[dict[str, str]]:  # fmt: skip
    """Replace the i-th marker by token_counts[i] placeholders; the counts must match."""
    where = sample_prefix(sample_id)
    found = sum(count_markers(m["content"]) for m in messages)
    if found != len(token_counts):
        raise ConversationError(
            f"{where}the conversation has {found} visual markers but the sample "
            f"has {len(token_counts)} visual items"
        )
    if image_token not in MARKERS and any(image_token in m["content"] for m in messages):
        # Only a marker may put placeholders into the prompt.
        raise ConversationError(f"{where}{image_token} is reserved for visual placeholders")
    counts = iter(token_counts)
    out = []
    for m in messages:
        if m["role"] != "user" and count_markers(m["content"]):
            raise ConversationError(f"{where}visual markers are allowed in human turns only")
        out.append(
            {**m, "content": MARKER_PATTERN.sub(lambda _: image_token * next(counts), m["content"])}
        )
    return out


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _template_pieces(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> tuple[list[str], dict[int, int]]:
    """The chat template's own text around the turns' text: `pieces[0] + text0 + pieces[1]
    + ...`, and for each assistant turn k how many characters of `pieces[k + 1]` close
    it (trained on, as its end-of-turn token). The template renders stand-ins for the
    turns' text, so no turn's text is ever read as template."""
    nonce = uuid.uuid4().hex
    stand_ins = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    skeleton = [{**m, "content": s} for m, s in zip(messages, stand_ins, strict=True)]
    rest, pieces = _render(tokenizer, skeleton, add_generation_prompt), []
    for s in stand_ins:
        before, found, rest = rest.partition(s)
        pieces.append(before)
        if not found:
            break
    pieces.append(rest)
    if len(pieces) != len(messages) + 1 or any(nonce in p for p in pieces):
        raise ConversationError("the chat template does not show each turn's text once, in order")
    closing = {}
    for k, m in enumerate(skeleton):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, skeleton[:k], add_generation_prompt=True)
        upto = _render(tokenizer, skeleton[: k + 1], add_generation_prompt=False).rstrip("\n")
        if not upto.startswith(prefix + stand_ins[k]):
            raise ConversationError("the chat template does not render turns incrementally")
        closing[k] = len(upto) - len(prefix) - len(stand_ins[k])
        if not pieces[k + 1].startswith(upto[len(upto) - closing[k] :]):
            raise ConversationError("the chat template does not render turns incrementally")
    return pieces, closing


def _encode_text(tokenizer, text: str, image_token: str, image_id: int) -> list[int]:
    """A turn's text: runs of placeholders (put there by `expand_markers`) become the
    placeholder id, everything else is plain text, special-token strings included."""
    ids: list[int] = []
    for part in re.split(f"((?:{re.escape(image_token)})+)", text):
        if part.startswith(image_token):
            ids += [image_id] * (len(part) // len(image_token))
        elif part:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    control = set(tokenizer.all_special_ids) - {image_id}
    leaked = [i for i in ids if i in control]
    if leaked:  # a tokenizer that cannot read special-token strings as text
        raise ConversationError(
            f"the text holds the control token {tokenizer.convert_ids_to_tokens(leaked[0])!r}"
        )
    return ids


def tokenize_conversation(
    tokenizer,
    messages: list[dict[str, str]],
    image_token: str,
    *,
    add_generation_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for a whole conversation (markers already expanded); labels
    keep only the answers. With `add_generation_prompt`, the ids end with the template's
    prompt for the assistant's next turn."""
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    pieces, closing = _template_pieces(tokenizer, messages, add_generation_prompt)
    ids: list[int] = []
    labels: list[int] = []

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if trained else [IGNORE_INDEX] * len(tokens))

    def template(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    add(template(pieces[0]), False)
    for k, m in enumerate(messages):
        answer = m["role"] == "assistant"
        add(_encode_text(tokenizer, m["content"], image_token, image_id), answer)
        after = pieces[k + 1]
        if answer:
            add(template(after[: closing[k]]), True)
            after = after[closing[k] :]
        add(template(after), False)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def prompt_ids(tokenizer, messages: list[dict[str, str]], token_counts: Sequence[int], image_token: str,
               sample_id: str | None = None) -> torch.Tensor:  # fmt: skip
    """`[L]` ids of a chat to answer (markers replaced by their visual placeholders),
    ending with the template's generation prompt. The messages' text never becomes special
    tokens: only the template's own text and the placeholders do (as in training)."""
    chat = expand_markers(messages, list(token_counts), image_token, sample_id)
    ids, _ = tokenize_conversation(tokenizer, chat, image_token, add_generation_prompt=True)
    return ids
