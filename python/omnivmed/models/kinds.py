"""The kinds of visual input and the prompt marker of each. Every layer (readers, records,
prompts, processor, model, inference, serving, converters) speaks of items by these, so
they live apart from any of them: a medium's marker is written here and nowhere else."""

from __future__ import annotations

import re
from enum import IntEnum


class VisualKind(IntEnum):
    """What one visual item is. The value travels in `visual_kinds` tensors."""

    IMAGE = 0
    VIDEO = 1
    VOLUME = 2

    @property
    def marker(self) -> str:
        """The placeholder that stands for one item of this kind in a prompt."""
        return _MARKER_OF[self]

    @property
    def records_key(self) -> str:
        """The field of an instruction record that lists the files of this kind."""
        return f"{self.name.lower()}s"

    @classmethod
    def from_marker(cls, marker: str) -> VisualKind:
        try:
            return _KIND_OF[marker]
        except KeyError:
            raise ValueError(f"{marker!r} is not a visual marker (known: {MARKERS})") from None


_MARKER_OF = {
    VisualKind.IMAGE: "<image>",
    VisualKind.VIDEO: "<video>",
    VisualKind.VOLUME: "<image3d>",
}
_KIND_OF = {marker: kind for kind, marker in _MARKER_OF.items()}

MARKERS: tuple[str, ...] = tuple(_MARKER_OF[kind] for kind in VisualKind)
"""Every medium's marker, in `VisualKind` order."""

MARKER_PATTERN = re.compile("|".join(re.escape(m) for m in MARKERS))
"""Finds any medium's marker in a text (no marker is a prefix of another)."""
