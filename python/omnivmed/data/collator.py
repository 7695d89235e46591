"""Batches: text packed into one sequence (or padded), visual inputs concatenated in order."""

from __future__ import annotations

from typing import Any

import torch

from ..processing.prompt import IGNORE_INDEX
from ..processing.visual_batch import VisualBatch


class VisualCollator:
    """`packing=True`: every sample's tokens are concatenated into one row `[1, T]` with
    `position_ids` restarting at each sample and no attention mask (no padding; transformers
    keeps the samples apart from the position ids when the model runs with
    use_cache=False). Otherwise
    samples are padded to the longest (`padding_side`). `max_tokens` caps a batch's text
    tokens: a batch over it is an error, so the sampler must respect it."""

    def __init__(self, pad_token_id: int, packing: bool = False, padding_side: str = "right",
                 max_tokens: int | None = None) -> None:  # fmt: skip
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.padding_side = padding_side
        self.max_tokens = max_tokens

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None]
        batch: dict[str, Any] = {
            "num_skipped": len(samples) - len(kept),
            "ids": [s["id"] for s in kept],
        }
        if not kept:
            return batch
        lengths = [s["input_ids"].numel() for s in kept]
        if self.max_tokens is not None and sum(lengths) > self.max_tokens:
            raise ValueError(
                f"batch of {sum(lengths)} tokens exceeds max_tokens = {self.max_tokens}"
            )
        if self.packing:
            batch["input_ids"] = torch.cat([s["input_ids"] for s in kept]).unsqueeze(0)
            batch["labels"] = torch.cat([s["labels"] for s in kept]).unsqueeze(0)
            # No attention_mask: transformers then detects the packed samples from the restarting
            # position_ids (run with use_cache=False) and keeps them apart.
            batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        else:
            longest = max(lengths)
            ids = torch.full((len(kept), longest), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(kept), longest), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(kept), longest), dtype=torch.long)
            for i, (s, n) in enumerate(zip(kept, lengths, strict=True)):
                cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
                ids[i, cols], labels[i, cols], mask[i, cols] = s["input_ids"], s["labels"], 1
            batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        visual = VisualBatch.concat([s["visual"] for s in kept])
        if visual.num_items:
            batch.update(visual.model_inputs())
        return batch
