"""From pixels to model inputs: patchify (+ prune), and (to come) readers and prompts."""

from .patchify import patchify, unpatchify
from .visual_batch import VisualBatch, VisualItem, pack_visual_items

__all__ = ["VisualBatch", "VisualItem", "pack_visual_items", "patchify", "unpatchify"]
