"""An OpenAI-compatible chat endpoint (a vLLM or SGLang server, say) as a caption backend:
the clip's frames go as image parts, with a timeout per request and retries with
exponential back-off on timeouts, refused connections, 429 and 5xx."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from .backends import BackendError, Clip


@dataclass
class HttpBackend:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str = "default"
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_tokens: int = 256

    @property
    def name(self) -> str:
        return f"{self.base_url}#{self.model}"

    def complete(self, clip: Clip, prompt: str, temperature: float) -> str:
        import httpx

        if clip.path.is_dir():  # frames as image parts, in order
            parts = [
                {"type": "image_url", "image_url": {"url": f"data:{_mime(f)};base64," + base64.b64encode(f.read_bytes()).decode()}}
                for f in clip.frames()
            ]  # fmt: skip
        else:  # a video file, as vLLM's video part
            url = "data:video/mp4;base64," + base64.b64encode(clip.path.read_bytes()).decode()
            parts = [{"type": "video_url", "video_url": {"url": url}}]
        body = {"model": self.model, "temperature": temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]}  # fmt: skip
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = httpx.post(f"{self.base_url.rstrip('/')}/chat/completions", json=body, headers=headers,
                               timeout=self.timeout)  # fmt: skip
            except httpx.HTTPError as exc:  # timeouts and connection errors are retried
                last = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                raise BackendError(f"{self.name}: HTTP {r.status_code}: {r.text[:200]}")
            try:
                return str(r.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"malformed response {r.text[:120]!r}"
        raise BackendError(f"{self.name}: failed after {self.retries + 1} attempts ({last})")


def _mime(path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return "image/jpeg" if suffix in ("jpg", "jpeg") else f"image/{suffix}"
