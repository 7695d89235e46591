"""One question about one image, volume or video: read, prune, prompt, generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.token_counts import VisualKind
from ..processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from ..processing.prompt import expand_markers
from ..processing.visual_batch import pack_visual_items

_MARKER = {VisualKind.IMAGE: "<image>", VisualKind.VIDEO: "<video>", VisualKind.VOLUME: "<image3d>"}


@dataclass
class Answer:
    text: str
    visual_tokens: int  # with pruning as configured
    visual_tokens_unpruned: int


@torch.no_grad()
def answer_question(model, tokenizer, kind: VisualKind, path: str | Path, question: str,
                    options: ProcessorOptions | None = None, max_new_tokens: int = 48) -> Answer:  # fmt: skip
    processor = OmniVMedProcessor(model.config, tokenizer, options)
    item = processor.load(Media(kind, path))
    visual = pack_visual_items([item], model.config, prune=processor.options.prune,
                               threshold=processor.options.prune_threshold)  # fmt: skip
    question_turn = [{"role": "user", "content": f"{_MARKER[kind]}\n{question}"}]
    messages = expand_markers(question_turn, visual.token_counts, model.config.image_token)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    model.eval()
    out = model.generate(**inputs, **visual.model_inputs(), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    text = tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()
    return Answer(text, visual.token_counts[0], visual.unpruned_counts[0])
