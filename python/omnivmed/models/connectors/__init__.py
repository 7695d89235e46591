"""Connectors (visual features -> LLM embeddings), one per file, each registered in
`CONNECTORS` by its own decorator; the registry imports every module here on first
lookup, so a new connector is one new file."""

from .merge_mlp import MergeMLPConnector
from .mlp import MLPConnector
from .pooling import LearnedQueryPooling, attention_heads_for
from .resampler import ResamplerConnector

__all__ = [
    "LearnedQueryPooling",
    "MLPConnector",
    "MergeMLPConnector",
    "ResamplerConnector",
    "attention_heads_for",
]
