"""The kinds of visual input. Every layer (readers, records, processor, model, inference)
speaks of items by these, so they live apart from any of them."""

from __future__ import annotations

from enum import IntEnum


class VisualKind(IntEnum):
    """What one visual item is. The value travels in `visual_kinds` tensors."""

    IMAGE = 0
    VIDEO = 1
    VOLUME = 2
