"""Vision encoders, one per file, each registered in `ENCODERS` by its own decorator; the
registry imports every module here on first lookup, so a new encoder is one new file."""

from .rotary_siglip import RotaryVisionTower
from .siglip import SiglipVisionTower
from .siglip_weights import load_siglip_weights

__all__ = ["RotaryVisionTower", "SiglipVisionTower", "load_siglip_weights"]
