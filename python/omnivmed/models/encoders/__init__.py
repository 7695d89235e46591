"""Vision encoders, one per file; importing this package registers them."""

from .rotary_siglip import RotaryVisionTower
from .siglip import SiglipVisionTower
from .siglip_weights import load_siglip_weights

__all__ = ["RotaryVisionTower", "SiglipVisionTower", "load_siglip_weights"]
