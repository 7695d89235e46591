"""The one generation path of `omnivmed-infer`, `omnivmed-eval run` and `omnivmed-serve`.

A prompt is a chat whose markers stand for a `VisualBatch`'s items, tokenised as training
tokenises it (`build_prompt`). Prompts are decoded together (`generate`): left-padded so
every row's answer starts at the same column, their visual inputs concatenated in row
order (`prepare_batch`), one `generate` call. Each row decodes on its own (`Sampling`):
greedy at temperature 0, else sampled at its temperature and top_p from its own random
generator seeded by its `seed`, so a row gets the same answer alone or batched. Every new
token goes through one tracker that ends each row on its own (end of turn, a stop string,
its token limit, cancellation) and can hand its new text to a streamer.

A model's saved `generation_config.json` may set a `repetition_penalty`; it counts the
answer's own tokens only, never the prompt's (placeholders included), as a model that
generates from embeddings alone sees it (MedM-VL's released models were tuned that way).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ..processing.processor import OmniVMedProcessor
from ..processing.prompt import prompt_ids
from ..processing.visual_batch import VisualBatch


@dataclass
class Sampling:
    """How one row is decoded: at most `max_tokens` new tokens, greedy at temperature 0
    (the default), else sampled among the smallest set of likeliest tokens whose
    probability reaches `top_p`; the text ends before the first of the `stop` strings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # None: a fresh random seed per row


@dataclass
class Prompt:
    """One row: the prompt's token ids `[L]` and its visual inputs (None: text only)."""

    input_ids: torch.Tensor
    visual: VisualBatch | None = None


@dataclass
class Batch:
    """Prompts left-padded to `[B, L]` and their visual inputs in row order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visual: VisualBatch | None

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        visual = self.visual.model_inputs() if self.visual is not None else {}
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **visual}
        return {k: v.to(device) for k, v in inputs.items()}


@dataclass
class Generated:
    """One row's answer: its new tokens (up to, not with, the end-of-turn token), the
    text delivered (cut before a stop string) and why it ended: "stop" (end of turn or
    a stop string), "length" or "cancelled"."""

    tokens: list[int]
    text: str
    finish_reason: str


def build_prompt(
    processor: OmniVMedProcessor,
    messages: list[dict[str, str]],
    visual: VisualBatch | None = None,
    sample_id: str | None = None,
) -> Prompt:
    """A chat to answer (one marker per item of `visual`, in order), ending with the
    template's generation prompt. Errors name `sample_id` when given."""
    counts = list(visual.token_counts) if visual is not None else []
    ids = prompt_ids(processor.tokenizer, messages, counts, processor.config.image_token, sample_id)
    return Prompt(ids, visual)


def prepare_batch(prompts: Sequence[Prompt], pad_token_id: int) -> Batch:
    """Every prompt ending at the last column (so all answers start at column L), the
    visual inputs of all rows concatenated in row order."""
    longest = max(p.input_ids.numel() for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[i, longest - n :], mask[i, longest - n :] = p.input_ids, 1
    visuals = [p.visual for p in prompts if p.visual is not None]
    visual = VisualBatch.concat(visuals) if visuals else None
    return Batch(ids, mask, visual if visual is not None and visual.num_items else None)


def draw(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """The index `[1]` of one token drawn from `logits` `[V]` at `temperature`, among the
    smallest set of most likely tokens whose probability reaches `top_p`. One uniform
    number per draw (inverse CDF), so a generator's k-th draw depends on nothing but its
    seed and k. Stays on the logits' device (no synchronisation)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs, order = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:
        probs = probs * ((torch.cumsum(probs, 0) - probs) < top_p)  # the first always stays
    cdf = torch.cumsum(probs, 0)
    u = torch.rand(1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[-1]
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
    return order[k]


class _RowSampler(LogitsProcessor):
    """Sampling per row: a sampled row's scores become one finite entry, its own draw, so
    the greedy step of `generate` takes it; greedy rows pass through unchanged."""

    def __init__(self, sampling: Sequence[Sampling]):
        self.sampling = sampling
        self.generators: list[torch.Generator | None] = [None] * len(sampling)

    def _generator(self, i: int, device: torch.device) -> torch.Generator:
        if self.generators[i] is None:
            seed = self.sampling[i].seed
            seed = secrets.randbits(63) if seed is None else seed
            self.generators[i] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[i]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i, s in enumerate(self.sampling):
            if s.temperature <= 0:
                continue
            token = draw(scores[i], s.temperature, s.top_p, self._generator(i, scores.device))
            if out is scores:
                out = scores.clone()
            out[i] = float("-inf")
            out[i].index_fill_(0, token, 0.0)
        return out


class _Rows(BaseStreamer, StoppingCriteria):
    """Per-row state of one generate call: tokens, text, when each row is done. Text
    that may still turn into a stop string, or ends inside a multi-byte character, is
    held back until the next token decides it."""

    def __init__(self, tokenizer, sampling: Sequence[Sampling], eos_ids: set[int],
                 on_text: Callable[[int, str], None] | None,
                 cancelled: Callable[[int], bool] | None) -> None:  # fmt: skip
        self.tokenizer, self.sampling, self.eos_ids = tokenizer, sampling, eos_ids
        self.on_text, self.cancelled = on_text, cancelled
        self.tokens: list[list[int]] = [[] for _ in sampling]
        self.sent: list[str] = ["" for _ in sampling]
        self.done: list[str | None] = [None for _ in sampling]
        self.prompt_seen = False

    def _decode(self, i: int) -> str:
        return self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if self.cancelled is not None and self.cancelled(i):
                self.done[i] = "cancelled"
                continue
            if token in self.eos_ids:
                self.done[i] = "stop"
                self._flush(i, self._decode(i))
                continue
            self.tokens[i].append(token)
            stops = self.sampling[i].stop
            if len(self.tokens[i]) >= self.sampling[i].max_tokens:
                self.done[i] = "length"
            if self.on_text is None and not stops:
                continue  # nobody reads the text before the end
            text = self._decode(i)
            for stop in stops:
                at = text.find(stop)
                if at >= 0:
                    text, self.done[i] = text[:at], "stop"
            if not self.done[i]:
                hold = max((len(x) - 1 for x in stops), default=0)
                text = text[: len(text) - hold] if hold else text
                if text.endswith("\ufffd"):
                    continue
            self._flush(i, text)

    def _flush(self, i: int, text: str) -> None:
        """Deliver what `text` adds to what was delivered (at the end: everything held
        back)."""
        if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
            if self.on_text is not None:
                self.on_text(i, text[len(self.sent[i]) :])
            self.sent[i] = text

    def finish(self) -> list[Generated]:
        """Held-back text is final at the token limit too."""
        out = []
        for i, s in enumerate(self.sampling):
            if self.done[i] != "stop":
                text = self._decode(i)
                if not any(x in text for x in s.stop):
                    self._flush(i, text)
            out.append(Generated(self.tokens[i], self.sent[i], self.done[i] or "length"))
        return out

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([d is not None for d in self.done], device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    sampling: Sequence[Sampling] | Sampling,
    *,
    on_text: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> list[Generated]:
    """Answers to `prompts` from one `generate` call, in their order. `sampling`: one
    per row, or one for all. `on_text(row, delta)` receives each row's new text as it is
    decoded (a streamer); `cancelled(row)` is asked before each of a row's tokens and
    ends the row when true."""
    if isinstance(sampling, Sampling):
        sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling settings")
    device = next(model.parameters()).device
    batch = prepare_batch(prompts, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    rows = _Rows(
        tokenizer, sampling, set(eos if isinstance(eos, list) else [eos]), on_text, cancelled
    )
    processors = []
    penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        # Over the answers only (every column after the left-padded prompts), as MedM-VL,
        # which generates from embeddings, applies it.
        processors.append(RepetitionPenaltyLogitsProcessor(
            float(penalty), prompt_ignore_length=batch.input_ids.shape[1]))  # fmt: skip
    processors.append(_RowSampler(sampling))
    # Greedy decoding over scores the row sampler has already decided for sampled rows.
    model.generate(
        **batch.model_inputs(device), max_new_tokens=max(s.max_tokens for s in sampling),
        do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, streamer=rows,
        stopping_criteria=StoppingCriteriaList([rows]),
        repetition_penalty=1.0, logits_processor=LogitsProcessorList(processors),
    )  # fmt: skip
    return rows.finish()
