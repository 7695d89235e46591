"""Connectors (visual features -> LLM embeddings), one per file; importing this package
registers them."""

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
