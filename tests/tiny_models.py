"""The tiny preset with answers that depend on the input, for tests that compare answers
across tools or requests."""

from __future__ import annotations

import torch

from omnivmed.models import build_preset


def answering_tiny_model():
    """(model in eval mode, tokenizer): the tiny preset, seeded, with large random LLM
    weights (at their initial scale every answer would be the same few tokens)."""
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval(), tokenizer
