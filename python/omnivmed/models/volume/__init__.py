"""Volume strategies (how a 3D volume becomes connector input), one per file, each
registered in `VOLUME_STRATEGIES` by its own decorator; the registry imports every module
here on first lookup, so a new strategy is one new file."""

from .encoder3d import Encoder3D, Encoder3DVolume
from .m3d_clip import load_m3d_vision_weights, m3d_encoder3d_config
from .rotary import RotaryVolume
from .slice_attn import SliceAttention, sinusoidal_positions
from .slice_avg import SliceAverage

__all__ = [
    "Encoder3D",
    "Encoder3DVolume",
    "RotaryVolume",
    "SliceAttention",
    "SliceAverage",
    "load_m3d_vision_weights",
    "m3d_encoder3d_config",
    "sinusoidal_positions",
]
