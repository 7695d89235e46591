"""What the caption pipeline needs from a model, and the strict reading of a judge's reply."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CRITERIA = ("relevance", "fluency", "accuracy")
JUDGE_PROMPT = (
    "You judge a caption written for the surgical or medical video clip shown. Rate it on "
    "relevance, fluency and accuracy, each an integer from 1 (worst) to 5 (best). Reply with "
    'only a JSON object, e.g. {"relevance": 4, "fluency": 5, "accuracy": 3}.\n\nCaption: '
)
GENERATE_PROMPT = "Describe what happens in this clip in two or three precise sentences."


class BackendError(RuntimeError):
    """A request that failed after its retries (timeouts, refused connections, 5xx)."""


class InvalidJudgementError(ValueError):
    """A judge reply that is not exactly a JSON object of integer scores 1-5."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Clip:
    id: str
    path: Path  # a video file, or a folder of frame images (sorted by name)

    def frames(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class Backend(Protocol):
    name: str

    def complete(self, clip: Clip, prompt: str, temperature: float) -> str: ...


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_judgement(reply: str) -> dict[str, int]:
    """The scores in a judge's reply: a JSON object (optionally in one ``` fence) with an
    integer 1-5 for each criterion and nothing else. Anything else is invalid: never read
    by guesswork."""
    text = reply.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidJudgementError(f"not a JSON object: {reply[:80]!r}") from None
    if not isinstance(value, dict) or set(value) != set(CRITERIA):
        raise InvalidJudgementError(f"expected exactly the keys {list(CRITERIA)}: {reply[:80]!r}")
    for key in CRITERIA:
        score = value[key]
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
            raise InvalidJudgementError(f"{key} must be an integer 1-5, got {score!r}")
    return {k: value[k] for k in CRITERIA}
