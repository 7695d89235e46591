"""The generation engine: requests that arrive together are decoded together.

Handlers prepare a request (media read and pruned once, the prompt tokenised) and submit
it. One worker thread takes the oldest request, waits up to `max_wait_ms` for others, up
to `max_batch_size`, and decodes them in one batch through the shared generation path
(`inference/generate.py`: each row sampled on its own, so requests with any sampling
settings share a batch and a seeded request gets the same text alone or batched). New
text of each row is routed to its request as it is decoded (deltas for streaming).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..inference.generate import Prompt, Sampling, generate


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


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_wait_ms: float = 10.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.pending: deque[Job] = deque()
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

    def _generate(self, batch: list[Job]) -> None:
        self.batches += 1

        def deliver(i: int, delta: str) -> None:
            job = batch[i]
            job.loop.call_soon_threadsafe(job.events.put_nowait, ("delta", delta))

        rows = generate(
            self.model, self.tokenizer, [Prompt(j.input_ids, j.visual) for j in batch],
            [j.sampling for j in batch], on_text=deliver, cancelled=lambda i: batch[i].cancelled,
        )  # fmt: skip
        for j, row in zip(batch, rows, strict=True):
            result = Result(row.text, row.finish_reason, j.input_ids.numel(), len(row.tokens))
            j.finish("done", result)
