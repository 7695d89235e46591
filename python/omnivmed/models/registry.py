"""Name -> class registries for the swappable parts (MedM-VL's modular design).

A part registers itself where it is defined (`@CONNECTORS.register("mlp")`); this module
imports none of them, so nothing here depends on the parts. Lookup is by exact name,
never by substring, and an unknown name is an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Class decorator: register under `name` and record the name on the class."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.registered_name = name
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Remove a part (for parts defined by tests or notebooks that are re-run)."""
        self.check(name)
        del self._entries[name]

    def check(self, name: str) -> None:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")

    def get(self, name: str) -> Any:
        self.check(name)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


ENCODERS = Registry("vision encoder")
CONNECTORS = Registry("connector")
VOLUME_STRATEGIES = Registry("volume strategy")
LLMS = Registry("LLM family")


def _register_causal_lms() -> None:
    """Every causal-LM family transformers knows (Qwen2/Qwen2.5 is the default)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        LLMS.register(model_type)(class_name)


_register_causal_lms()
