"""Intensities: CT windows, MRI percentile normalization, and the encoder's normalization."""

from __future__ import annotations

import numpy as np
import torch

from .errors import MediaError

# (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_WINDOW = "mediastinum"
# How volume intensities reach [0, 1] (see `to_unit_range`).
INTENSITY_MODES = ("auto", "ct_window", "percentile", "none", "uint8")


def window_ct(hu: np.ndarray, window: str | tuple[float, float] = DEFAULT_CT_WINDOW) -> np.ndarray:
    """Hounsfield units -> [0, 1] through a (level, width) window or a named preset."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(
                f"unknown CT window {window!r}; known windows: {', '.join(sorted(CT_WINDOWS))}"
            )
        level, width = CT_WINDOWS[window]
    else:
        level, width = window
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    low = level - width / 2
    return np.clip((hu - low) / width, 0.0, 1.0).astype(np.float32)


def normalize_percentile(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """MRI (or any uncalibrated) intensities -> [0, 1] between two percentiles."""
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    lo, hi = np.percentile(data, [low, high])
    if hi <= lo:
        return np.zeros_like(data, dtype=np.float32)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def volume_to_unit_range(data: np.ndarray, modality: str, window: str | tuple[float, float] | None = None,
                         source: str = "") -> np.ndarray:  # fmt: skip
    """CT through a window (the given one or the default), anything else by percentiles."""
    if modality.upper() == "CT" or window is not None:
        return window_ct(data, window or DEFAULT_CT_WINDOW)
    if data.size == 0:
        raise MediaError(source, "volume is empty")
    return normalize_percentile(data)


def to_unit_range(data: np.ndarray, modality: str, mode: str = "auto",
                  window: str | tuple[float, float] | None = None, source: str = "") -> np.ndarray:  # fmt: skip
    """Volume intensities -> [0, 1] by `mode`: "auto" (CT windowed, the rest by
    percentiles), "ct_window", "percentile", "none" (already in [0, 1], e.g. M3D's
    arrays: checked, never re-normalised) or "uint8" (grey levels already on a 0..255
    scale, cut to whole levels as a conversion to 8-bit integers does, then / 255: the
    `.npy` volumes of MedM-VL's CT models; values outside [0, 256) are refused)."""
    if data.size == 0:
        raise MediaError(source, "volume is empty")
    if mode == "auto":
        return volume_to_unit_range(data, modality, window, source)
    if mode == "ct_window":
        return window_ct(data, window or DEFAULT_CT_WINDOW)
    if mode == "percentile":
        return normalize_percentile(data)
    if mode == "none":
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > 1:
            raise MediaError(
                source, f"intensity 'none' takes values already in [0, 1], found [{lo:g}, {hi:g}]; "
                "use 'auto', 'ct_window' or 'percentile'"
            )  # fmt: skip
        return data.astype(np.float32, copy=False)
    if mode == "uint8":
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi >= 256:
            raise MediaError(
                source, f"intensity 'uint8' takes grey levels in [0, 256), found [{lo:g}, {hi:g}]; "
                "use 'auto', 'ct_window' or 'percentile'"
            )  # fmt: skip
        return (np.floor(data) / 255.0).astype(np.float32)
    raise ValueError(f"unknown intensity mode {mode!r}; known: {', '.join(INTENSITY_MODES)}")


def to_encoder_input(
    frames01: np.ndarray | torch.Tensor,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    channels: int = 3,
) -> torch.Tensor:
    """`[F, H, W]` or `[F, H, W, C]` in [0, 1] -> `[F, channels, H, W]` normalized the way
    the encoder was trained (SigLIP: mean 0.5, std 0.5). Grayscale is repeated to RGB."""
    x = torch.as_tensor(np.ascontiguousarray(frames01), dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"frames must be [F, H, W] or [F, H, W, C], got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1 and channels > 1:
        x = x.expand(-1, channels, -1, -1)
    if x.shape[1] != channels:
        raise ValueError(f"frames have {x.shape[1]} channels, the encoder takes {channels}")
    m = torch.tensor(mean[:channels]).view(1, -1, 1, 1)
    s = torch.tensor(std[:channels]).view(1, -1, 1, 1)
    return (x - m) / s
