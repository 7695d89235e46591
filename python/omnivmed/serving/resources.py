"""What one request may take of the server's memory, and giving memory back after a
request that was refused once its media were being read."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from functools import cache

import numpy as np

from ..processing.processor import Media, OmniVMedProcessor, ReadMedium
from .requests import RequestError


def decoded_pixels(frames01: np.ndarray) -> int:
    """Pixels of every frame, slice or image read (channels not counted)."""
    return int(np.prod(frames01.shape[:3]))


class BudgetedProcessor(OmniVMedProcessor):
    """The server's processor as one request sees it: reading stops with a 413 as soon as
    the media read so far hold more than `max_pixels` pixels. One file is bounded before
    it is decoded by the processor's own `max_bytes`, so a request never holds more than
    its budget plus one file."""

    def __init__(self, shared: OmniVMedProcessor, max_pixels: int):
        # The config, tokenizer, options and parts are the shared processor's; only the
        # budget belongs to the request.
        vars(self).update(vars(shared))
        self.max_request_pixels = max_pixels
        self.pixels_read = 0

    def read(self, media: Media) -> ReadMedium:
        medium = super().read(media)
        self.pixels_read += decoded_pixels(medium.frames01)
        if self.pixels_read > self.max_request_pixels:
            raise RequestError(413, f"the request's media decode to over {self.max_request_pixels} "
                                    "pixels (every slice and frame counted); send fewer or "
                                    "smaller media")  # fmt: skip
        return medium


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _Releaser:
    """Runs one release at a time; a call made meanwhile runs one more pass after it, so
    the memory of the last refused request is never left behind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.again = False

    def __call__(self) -> None:
        with self.lock:
            if self.running:
                self.again = True
                return
            self.running = True
        while True:
            _release_once()
            with self.lock:
                if not self.again:
                    self.running = False
                    return
                self.again = False


def _release_once() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# Collect garbage and hand the C heap's free pages back to the system. Freed arrays
# otherwise stay in the allocator's arenas (one per worker thread), so memory taken by
# refused requests would never come back.
release_memory = _Releaser()
