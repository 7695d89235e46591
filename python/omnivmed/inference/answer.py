"""Questions about one image, volume or video: read, prune, prompt, generate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.kinds import VisualKind
from ..processing.processor import Media, OmniVMedProcessor
from ..processing.prompt import refuse_markers
from .generate import Sampling, build_prompt, generate


@dataclass
class Answer:
    question: str
    text: str
    visual_tokens: int  # with pruning as configured
    visual_tokens_unpruned: int
    seconds: float  # generation time of this answer


@torch.no_grad()
def answer_questions(model, processor: OmniVMedProcessor, kind: VisualKind, path: str | Path,
                     questions: Sequence[str], max_new_tokens: int = 48) -> list[Answer]:  # fmt: skip
    """Greedy answers to each question about one medium, read and pruned once, on the
    model's device. A question may not hold a medium's marker: the medium is `path`.
    Errors name the file or the question."""
    for question in questions:
        refuse_markers(question, f"question {question!r}")
    # As training reads it; errors name the file.
    visual = processor.encode_media([Media(kind, path)])
    model.eval()
    answers = []
    for question in questions:
        start = time.perf_counter()
        prompt = build_prompt(
            processor, [{"role": "user", "content": f"{kind.marker}\n{question}"}], visual
        )
        try:
            processor.check_length(prompt.input_ids.numel(), visual.token_counts[0])
        except ValueError as exc:
            raise ValueError(f"question {question!r}: {exc}") from None
        (row,) = generate(model, processor.tokenizer, [prompt], Sampling(max_new_tokens))
        answers.append(Answer(question, row.text.strip(), visual.token_counts[0],
                              visual.unpruned_counts[0], time.perf_counter() - start))  # fmt: skip
    return answers


def answer_question(model, processor: OmniVMedProcessor, kind: VisualKind, path: str | Path,
                    question: str, max_new_tokens: int = 48) -> Answer:  # fmt: skip
    """One greedy answer (see `answer_questions`)."""
    return answer_questions(model, processor, kind, path, [question], max_new_tokens)[0]
