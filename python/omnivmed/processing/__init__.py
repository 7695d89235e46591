"""From files and conversations to model inputs: readers (image, volume, video), intensity,
resizing, patchify (+ prune), prompts, and the processor that ties them together."""

from .patchify import patchify, unpatchify
from .visual_batch import VisualBatch, VisualItem, pack_visual_items

__all__ = ["VisualBatch", "VisualItem", "pack_visual_items", "patchify", "unpatchify"]
