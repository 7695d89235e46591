"""From pixels to model inputs: patchify (+ prune), and (to come) readers and prompts."""

from .patchify import patchify, unpatchify

__all__ = ["patchify", "unpatchify"]
