"""How media become visual tokens: every setting of reading, sizing, pruning and capping,
owned here once. A training stage holds one `ProcessorOptions` (its YAML `media:`
mapping), saves it next to the exported model as `processor_config.json`, and inference
reads it back, so both see the same tokens for the same file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import typed_fields
from .intensity import INTENSITY_MODES
from .readers import DEFAULT_MAX_BYTES, DEFAULT_MAX_SECONDS

PROCESSOR_CONFIG_NAME = "processor_config.json"
# processor_config.json also holds, under this key, what the processor takes from the
# model config (written by OmniVMedProcessor.save_pretrained); the settings are the rest.
MODEL_SECTION = "model_config"
PRUNE_MODES = ("previous", "last_kept")  # l1_prune's modes
RESIZE_RULES = ("bilinear", "pil_bicubic")  # see ProcessorOptions.resize


@dataclass
class ProcessorOptions:
    """Media settings of a stage (and of inference, read back from the saved model).

    Sizing: frames are snapped to the patch grid with an area in [min_pixels, max_pixels]
    (native resolution; an encoder with a fixed input size ignores them). Budgets: at most
    `max_slices` slices of a volume and `max_video_frames` frames of a video, spread evenly,
    videos sampled at `video_fps` (or `video_frames` in all). Cap: a sample's visual tokens
    *after pruning* must fit `max_visual_tokens`; over it, the pixel budget shrinks first
    (frames stay consecutive), then frames are thinned, re-pruning after each step.

    Pruning (`prune`, `prune_threshold`, `prune_mode`): the L1 distance is the mean
    absolute difference of a patch's encoder-normalised values (SigLIP: [-1, 1], so 0.1 is
    0.05 on a [0, 1] scale, about 13 grey levels of 255) to the same patch of the
    previous frame ("previous") or of the last frame where that patch was kept
    ("last_kept").

    Bounds on reading one file: `max_bytes` (its data as float32, checked from the header
    before decoding) and `max_read_seconds` (checked between frames, slices and files).

    Intensity (`intensity`, per dataset here and per record in its media entry): "auto"
    windows CT (`ct_window`, default mediastinum) and percentile-normalises the rest;
    "ct_window", "percentile", or "none" for arrays already in [0, 1] (M3D's volumes).

    Resampling (`resize`) to the size chosen above: "bilinear" resizes the float frames
    (antialiased when shrinking); "pil_bicubic" turns each frame into 8-bit RGB and resizes
    it with Pillow's bicubic filter before normalising, as SigLIP's image processor does
    (the preprocessing MedM-VL's models were trained with). `image_mean` / `image_std`:
    the encoder's normalisation of [0, 1] values.

    True positions (`true_positions`, off by default as in the paper): t is where a frame
    is, not its index among the sampled ones: a video frame's time in units of
    `seconds_per_t`, a slice's position along the scan in units of `mm_per_t`.
    """

    min_pixels: int = 64 * 64
    max_pixels: int = 448 * 448
    max_slices: int = 32
    max_visual_tokens: int = 4096
    video_fps: float | None = 1.0
    video_frames: int | None = None
    max_video_frames: int = 32
    intensity: str = "auto"
    ct_window: str | tuple[float, float] | None = None  # a window name or (level, width)
    prune: bool = True
    prune_threshold: float = 0.1
    prune_mode: str = "previous"
    true_positions: bool = False
    seconds_per_t: float = 1.0
    mm_per_t: float = 5.0
    max_sequence_length: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_read_seconds: float | None = DEFAULT_MAX_SECONDS
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        """Every value range-checked when the settings are built (flags, YAML, saved JSON)."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"processor setting {name} = {getattr(self, name)!r}: {rule}")

        def number(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def positive_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not number(name) or int(v) != v or v < 1:
                raise bad(name, "must be a positive integer" + (" (or None)" if optional else ""))
            setattr(self, name, int(v))

        for name in ("min_pixels", "max_pixels", "max_slices", "max_visual_tokens",
                     "max_video_frames", "max_bytes"):  # fmt: skip
            positive_int(name)
        positive_int("video_frames", optional=True)
        positive_int("max_sequence_length", optional=True)
        if self.min_pixels > self.max_pixels:
            raise bad("min_pixels", f"must not exceed max_pixels = {self.max_pixels}")
        if self.video_fps is not None and (not number("video_fps") or self.video_fps <= 0):
            raise bad("video_fps", "must be a positive number of frames per second (or None)")
        if self.max_read_seconds is not None and (
            not number("max_read_seconds") or self.max_read_seconds <= 0
        ):
            raise bad("max_read_seconds", "must be a positive number of seconds (or None)")
        for name in ("seconds_per_t", "mm_per_t"):
            if not number(name) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive number")
        if not number("prune_threshold") or self.prune_threshold < 0:
            raise bad("prune_threshold", "must be a finite number >= 0")
        for name in ("prune", "true_positions"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.prune_mode not in PRUNE_MODES:
            raise bad("prune_mode", f"must be one of {PRUNE_MODES}")
        if self.resize not in RESIZE_RULES:
            raise bad("resize", f"must be one of {RESIZE_RULES}")
        if self.intensity not in INTENSITY_MODES:
            raise bad("intensity", f"must be one of {INTENSITY_MODES}")
        for name in ("image_mean", "image_std"):
            values = tuple(getattr(self, name))
            if len(values) != 3 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values
            ):
                raise bad(name, "must be three finite numbers")
            setattr(self, name, values)
        if min(self.image_std) <= 0:
            raise bad("image_std", "must be positive")

    def replace(self, **changes: Any) -> ProcessorOptions:
        """A copy with `changes` (checked like any other)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "media settings") -> ProcessorOptions:
        """From a YAML/JSON mapping, each value converted by its field's type (numbers
        written as strings, lists for tuples); unknown keys are an error that lists the
        known ones, and every error starts with `where`."""
        return typed_fields.from_mapping(cls, data, where)

    def save(self, directory: str | Path) -> Path:
        """Write the settings next to a saved model (`processor_config.json`), so inference
        reads media exactly as training did."""
        path = Path(directory) / PROCESSOR_CONFIG_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_dir(cls, directory: str | Path) -> ProcessorOptions:
        """The settings saved with a model; the defaults when the directory has none."""
        path = Path(directory) / PROCESSOR_CONFIG_NAME
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != MODEL_SECTION}
        if isinstance(data, dict) and data.get("prune_threshold", 0.0) is None:
            data.pop("prune_threshold")  # written before the threshold had its own default
        try:
            return cls.from_mapping(data, str(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from exc
