"""The model: configuration, rotary vision tower, connectors, 3D strategies, LLM glue,
registries and presets. Importing it registers the model with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .builder import PRESETS, build_model, build_preset
from .configuration import (
    DEFAULT_ROPE_SECTIONS,
    OmniVMedConfig,
    OmniVMedEncoder3DConfig,
    OmniVMedVisionConfig,
    default_rope_sections,
)
from .modeling import OmniVMedForConditionalGeneration, OmniVMedPreTrainedModel
from .registry import CONNECTORS, ENCODERS, LLMS
from .token_counts import VisualKind, visual_token_count
from .tokenizer import add_image_token, build_tiny_tokenizer
from .vision import RotaryVisionTower, load_siglip_weights

AutoConfig.register(OmniVMedConfig.model_type, OmniVMedConfig, exist_ok=True)
AutoConfig.register(OmniVMedVisionConfig.model_type, OmniVMedVisionConfig, exist_ok=True)
AutoConfig.register(OmniVMedEncoder3DConfig.model_type, OmniVMedEncoder3DConfig, exist_ok=True)
AutoModelForCausalLM.register(OmniVMedConfig, OmniVMedForConditionalGeneration, exist_ok=True)
AutoModel.register(OmniVMedConfig, OmniVMedForConditionalGeneration, exist_ok=True)

__all__ = [
    "CONNECTORS",
    "DEFAULT_ROPE_SECTIONS",
    "ENCODERS",
    "LLMS",
    "PRESETS",
    "OmniVMedConfig",
    "OmniVMedEncoder3DConfig",
    "OmniVMedForConditionalGeneration",
    "OmniVMedPreTrainedModel",
    "OmniVMedVisionConfig",
    "RotaryVisionTower",
    "VisualKind",
    "add_image_token",
    "build_model",
    "build_preset",
    "build_tiny_tokenizer",
    "default_rope_sections",
    "load_siglip_weights",
    "visual_token_count",
]
