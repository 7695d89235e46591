"""omnivmed: a unified medical vision-language model over text, 2D images, 3D volumes and
videos (OmniV-Med and MedM-VL), built on the fused ops of :mod:`omnivmed_ext`."""

__version__ = "0.1.0"

from .models import (
    OmniVMedConfig,
    OmniVMedForConditionalGeneration,
    build_model,
    build_preset,
)

__all__ = [
    "OmniVMedConfig",
    "OmniVMedForConditionalGeneration",
    "__version__",
    "build_model",
    "build_preset",
]
