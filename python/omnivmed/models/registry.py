"""The model's part registries (MedM-VL's modular design): vision encoders, connectors and
volume strategies, each found in its own package (`encoders/`, `connectors/`, `volume/`),
one part per file, plus every causal-LM family transformers knows.

A part registers itself where it is defined (`@CONNECTORS.register("mlp")`); this module
imports none of them, so nothing here depends on the parts (`omnivmed.registry`).
"""

from __future__ import annotations

from ..registry import Registry

ENCODERS: Registry = Registry("vision encoder", package="omnivmed.models.encoders")
CONNECTORS: Registry = Registry("connector", package="omnivmed.models.connectors")
VOLUME_STRATEGIES: Registry = Registry(
    "volume strategy", plural="volume strategies", package="omnivmed.models.volume"
)
LLMS: Registry = Registry("LLM family", plural="LLM families")


def _register_causal_lms() -> None:
    """Every causal-LM family transformers knows (Qwen2/Qwen2.5 is the default)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        LLMS.register(model_type)(class_name)


_register_causal_lms()

__all__ = ["CONNECTORS", "ENCODERS", "LLMS", "VOLUME_STRATEGIES", "Registry"]
