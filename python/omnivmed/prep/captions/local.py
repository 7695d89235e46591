"""A saved omnivmed model folder as a caption backend (frames read as a video)."""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path

from .backends import Clip


class LocalBackend:
    def __init__(self, model_dir: str | Path, device: str = "auto", max_new_tokens: int = 96):
        self.model_dir, self.device, self.max_new_tokens = Path(model_dir), device, max_new_tokens
        self.lock = threading.Lock()  # one model, one generation at a time

    @property
    def name(self) -> str:
        return str(self.model_dir)

    @cached_property
    def loaded(self):
        from ...inference import load_for_inference

        return load_for_inference(self.model_dir, device=self.device)

    def complete(self, clip: Clip, prompt: str, temperature: float) -> str:
        from ...inference import answer_questions
        from ...models.kinds import VisualKind

        with self.lock:
            model, processor = self.loaded
            # Greedy: a local model's candidates differ through the prompt only.
            return answer_questions(model, processor, VisualKind.VIDEO, clip.path, [prompt],
                                    self.max_new_tokens)[0].text  # fmt: skip
