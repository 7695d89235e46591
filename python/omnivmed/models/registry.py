"""Name -> class registries for the swappable parts (MedM-VL's modular design).

Lookup is by exact name, never by substring, and an unknown name is an error that lists
the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def check(self, name: str) -> None:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")

    def get(self, name: str) -> Any:
        self.check(name)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


CONNECTORS = Registry("connector")
VOLUME_STRATEGIES = Registry("volume strategy")

# Importing the modules fills the registries.
from . import connectors as _connectors  # noqa: E402,F401
