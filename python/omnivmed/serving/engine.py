"""The generation engine: requests that arrive together are decoded together.

Handlers prepare a request (media read and pruned once, the prompt tokenised) and submit
it. One worker thread takes the oldest request, waits up to `max_wait_ms` for others, up
to `max_batch_size`, and runs one `generate` call for them: prompts left-padded, visual
inputs concatenated in order. Each row is sampled on its own (its temperature and top_p,
its own random generator seeded by its `seed`), so requests with any sampling settings
share a batch and a seeded request gets the same text alone or batched. A streamer
routes every new token to its request (text deltas for streaming, stop strings,
per-request token limits); a stopping criterion ends each row on its own.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from .requests import Sampling


@dataclass
class Job:
    input_ids: torch.Tensor  # [L]
    visual: Any  # VisualBatch or None
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("delta", text) ... then ("done", Result) or ("error", message)
    # Called on the event loop once the engine is through with the job (done, failed or
    # cancelled): what frees its in-flight slot.
    on_finish: Callable[[], None] | None = None
    # Set by the handler when its client went away: the row stops at the next token.
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)

    def finish(self, kind: str, value: Any) -> None:
        def deliver() -> None:
            self.events.put_nowait((kind, value))
            if self.on_finish is not None:
                self.on_finish()

        self.loop.call_soon_threadsafe(deliver)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _Rows(BaseStreamer, StoppingCriteria):
    """Per-row state of one generate call: tokens, text, when each row is done."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent: list[str] = ["" for _ in jobs]
        self.done: list[str | None] = [None for _ in jobs]
        self.prompt_seen = False

    def _emit(self, i: int, kind: str, value: Any) -> None:
        job = self.jobs[i]
        job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if self.jobs[i].cancelled:
                self.done[i] = "cancelled"
                continue
            if token in self.eos_ids:
                self.done[i] = "stop"
                self._flush(i, self.tokenizer.decode(self.tokens[i], skip_special_tokens=True))
                continue
            self.tokens[i].append(token)
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            for stop in self.jobs[i].sampling.stop:
                at = text.find(stop)
                if at >= 0:
                    text, self.done[i] = text[:at], "stop"
            if not self.done[i] and len(self.tokens[i]) >= self.jobs[i].sampling.max_tokens:
                self.done[i] = "length"
            # Text that may still turn into a stop string, or ends inside a multi-byte
            # character, is held back until the next token decides it.
            if not self.done[i]:
                hold = max((len(x) - 1 for x in self.jobs[i].sampling.stop), default=0)
                text = text[: len(text) - hold] if hold else text
                if text.endswith("\ufffd"):
                    continue
            self._flush(i, text)

    def _flush(self, i: int, text: str) -> None:
        """Send what `text` adds to what was sent (at the end: everything held back)."""
        if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
            self._emit(i, "delta", text[len(self.sent[i]) :])
            self.sent[i] = text

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([d is not None for d in self.done], device=input_ids.device)


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

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.generators: list[torch.Generator | None] = [None] * len(jobs)

    def _generator(self, i: int, device: torch.device) -> torch.Generator:
        if self.generators[i] is None:
            seed = self.jobs[i].sampling.seed
            seed = secrets.randbits(63) if seed is None else seed
            self.generators[i] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[i]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i, job in enumerate(self.jobs):
            s = job.sampling
            if s.temperature <= 0:
                continue
            token = draw(scores[i], s.temperature, s.top_p, self._generator(i, scores.device))
            if out is scores:
                out = scores.clone()
            out[i] = float("-inf")
            out[i].index_fill_(0, token, 0.0)
        return out


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_wait_ms: float = 10.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.pending: deque[Job] = deque()
        self.device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.batches = 0  # generate calls made (the load benchmark reads it)
        self.thread = threading.Thread(target=self._run, name="omnivmed-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _take(self, block: bool, timeout: float | None = None) -> bool:
        try:
            job = self.inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return True
        if job is None:
            return False
        self.pending.append(job)
        return True

    def _run(self) -> None:
        while True:
            if not self.pending and not self._take(block=True):
                return
            deadline = time.monotonic() + self.max_wait
            while len(self.pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0 or not self._take(block=True, timeout=left):
                    break
            batch = [
                self.pending.popleft() for _ in range(min(len(self.pending), self.max_batch_size))
            ]
            try:
                self._generate(batch)
            except Exception as exc:  # a failed batch answers its requests, the server goes on
                for j in batch:
                    j.finish("error", f"generation failed: {exc}")

    @torch.no_grad()
    def _generate(self, batch: list[Job]) -> None:
        from ..data.collator import concat_visual
        from ..inference.prompting import left_pad

        self.batches += 1
        tok = self.tokenizer
        ids, mask = left_pad([j.input_ids for j in batch], tok.pad_token_id)
        visuals = [j.visual for j in batch if j.visual is not None]
        visual_inputs = {
            k: v.to(self.device) for k, v in (concat_visual(visuals) if visuals else {}).items()
        }
        rows = _Rows(batch, tok, self.eos_ids)
        # Greedy decoding over scores the row sampler has already decided for sampled rows.
        self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **visual_inputs,
            max_new_tokens=max(j.sampling.max_tokens for j in batch), do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
            eos_token_id=list(self.eos_ids), streamer=rows, stopping_criteria=StoppingCriteriaList([rows]),
            logits_processor=LogitsProcessorList([_RowSampler(batch)]),
        )  # fmt: skip
        for i, j in enumerate(batch):
            if rows.done[i] != "stop":  # held-back text is final at the token limit too
                text = self.tokenizer.decode(rows.tokens[i], skip_special_tokens=True)
                if not any(x in text for x in j.sampling.stop):
                    rows._flush(i, text)
            result = Result(
                rows.sent[i], rows.done[i] or "length", j.input_ids.numel(), len(rows.tokens[i])
            )
            j.finish("done", result)
