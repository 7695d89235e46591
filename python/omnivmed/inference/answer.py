"""Questions about one image, volume or video: read, prune, prompt, generate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.kinds import VisualKind
from ..processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from ..processing.prompt import refuse_markers
from .prompting import prompt_ids

_MARKER = {VisualKind.IMAGE: "<image>", VisualKind.VIDEO: "<video>", VisualKind.VOLUME: "<image3d>"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Answer:
    question: str
    text: str
    visual_tokens: int  # with pruning as configured
    visual_tokens_unpruned: int
    seconds: float  # generation time of this answer


def load_for_inference(
    model_dir: str | Path, device: str = "auto", dtype: str = "auto"
) -> tuple[torch.nn.Module, object, ProcessorOptions]:
    """A model exported by `omnivmed-train` (or any `save_pretrained` directory of
    `OmniVMedForConditionalGeneration`) with its tokenizer and processor settings.

    `device`: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; `dtype`: "auto"
    (bfloat16 on a GPU that supports it, float32 otherwise), "float32", "bfloat16",
    "float16".
    """
    from transformers import AutoTokenizer

    from ..models.loading import ModelLoadError, load_saved_model

    path = Path(model_dir)
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)  # fmt: skip
    if dtype == "auto":
        on_gpu = target.type == "cuda" and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if on_gpu else torch.float32
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here (use cpu or auto)")
    model = load_saved_model(path, dtype=torch_dtype)
    model.to(target).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a folder without its tokenizer files
        raise ModelLoadError(f"{path}: the tokenizer cannot be loaded ({exc})") from exc
    return model, tokenizer, ProcessorOptions.from_dir(path)


@torch.no_grad()
def answer_questions(model, tokenizer, kind: VisualKind, path: str | Path, questions: Sequence[str],
                     options: ProcessorOptions | None = None, max_new_tokens: int = 48) -> list[Answer]:  # fmt: skip
    """Greedy answers to each question about one medium, read and pruned once, on the
    model's device. A question may not hold a marker (`<image>`, ...): the medium is
    `path`. Errors name the file or the question."""
    for question in questions:
        refuse_markers(question, f"question {question!r}")
    processor = OmniVMedProcessor(model.config, tokenizer, options)
    # As training reads it; errors name the file.
    visual = processor.encode_media([Media(kind, path)])
    device = next(model.parameters()).device
    visual_inputs = {k: v.to(device) for k, v in visual.model_inputs().items()}
    model.eval()
    answers = []
    for question in questions:
        start = time.perf_counter()
        turn = [{"role": "user", "content": f"{_MARKER[kind]}\n{question}"}]
        ids = prompt_ids(tokenizer, turn, visual.token_counts, model.config.image_token)
        try:
            processor.check_length(ids.numel(), visual.token_counts[0])
        except ValueError as exc:
            raise ValueError(f"question {question!r}: {exc}") from None
        out = model.generate(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device),
                             **visual_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        text = tokenizer.decode(out[0, ids.numel() :], skip_special_tokens=True).strip()
        answers.append(Answer(question, text, visual.token_counts[0], visual.unpruned_counts[0],
                              time.perf_counter() - start))  # fmt: skip
    return answers


def answer_question(model, tokenizer, kind: VisualKind, path: str | Path, question: str,
                    options: ProcessorOptions | None = None, max_new_tokens: int = 48) -> Answer:  # fmt: skip
    """One greedy answer (see `answer_questions`)."""
    return answer_questions(model, tokenizer, kind, path, [question], options, max_new_tokens)[0]
