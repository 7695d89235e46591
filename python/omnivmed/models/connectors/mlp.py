"""LLaVA-1.5's projector: Linear, GELU, Linear; one LLM token per visual feature."""

from __future__ import annotations

from torch import nn

from ..configuration import OmniVMedConfig
from ..parts import Connector
from ..registry import CONNECTORS


@CONNECTORS.register("mlp")
class MLPConnector(Connector, nn.Module):
    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        text_dim = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        return features

    def forward(self, features, positions, cu_seqlens):
        return self.linear_2(self.act(self.linear_1(features))), cu_seqlens
