"""Small media files built in memory for the server tests, and the data URLs that carry
them in a request."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
