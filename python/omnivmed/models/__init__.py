"""The model: configuration, parts (vision encoders, connectors, volume strategies), LLM
glue, registries and presets. Importing it registers the parts and the model with
transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# The parts register themselves on import, before any config names them.
from . import connectors, encoders, volume
from .builder import PRESETS, build_model, build_preset
from .configuration import (
    DEFAULT_ROPE_SECTIONS,
    OmniVMedConfig,
    OmniVMedEncoder3DConfig,
    OmniVMedVisionConfig,
    default_rope_sections,
)
from .encoders import RotaryVisionTower, SiglipVisionTower, load_siglip_weights
from .kinds import VisualKind
from .modeling import OmniVMedForConditionalGeneration, OmniVMedPreTrainedModel
from .parts import (
    Connector,
    ModelParts,
    VisionEncoder,
    VolumeInput,
    VolumeItem,
    VolumeStrategy,
    trainable_module_names,
    visual_token_count,
)
from .registry import CONNECTORS, ENCODERS, LLMS, VOLUME_STRATEGIES
from .tokenizer import add_image_token, build_tiny_tokenizer
from .volume import load_m3d_vision_weights, m3d_encoder3d_config

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
    "VOLUME_STRATEGIES",
    "Connector",
    "ModelParts",
    "OmniVMedConfig",
    "OmniVMedEncoder3DConfig",
    "OmniVMedForConditionalGeneration",
    "OmniVMedPreTrainedModel",
    "OmniVMedVisionConfig",
    "RotaryVisionTower",
    "SiglipVisionTower",
    "VisionEncoder",
    "VisualKind",
    "VolumeInput",
    "VolumeItem",
    "VolumeStrategy",
    "add_image_token",
    "build_model",
    "build_preset",
    "build_tiny_tokenizer",
    "connectors",
    "default_rope_sections",
    "encoders",
    "load_m3d_vision_weights",
    "load_siglip_weights",
    "m3d_encoder3d_config",
    "trainable_module_names",
    "visual_token_count",
    "volume",
]
