"""The processor: media files and a conversation -> model inputs with exact placeholder
counts. One place that ties reading, intensity, resizing, patchify + prune and prompts."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.configuration import OmniVMedConfig
from ..models.kinds import VisualKind
from ..models.parts import ModelParts, visual_token_count
from .errors import MediaError
from .intensity import to_encoder_input, volume_to_unit_range
from .prompt import expand_markers, to_messages, tokenize_conversation
from .readers import DEFAULT_MAX_BYTES, read_image, read_video, read_volume
from .resize import frames_within_token_cap, resize_frames, snap_size, uniform_indices
from .visual_batch import VisualBatch, VisualItem, pack_visual_items


@dataclass
class ProcessorOptions:
    min_pixels: int = 64 * 64
    max_pixels: int = 448 * 448
    max_slices: int = 32  # slices kept from a volume (evenly spread)
    max_visual_tokens: int = 4096  # per sample, after pruning; big items are subsampled to fit
    video_fps: float | None = 1.0
    video_frames: int | None = None
    max_video_frames: int = 32
    ct_window: str | None = None  # None: the default window for CT, percentiles otherwise
    prune: bool = True
    prune_threshold: float | None = None  # None: the model config's
    max_bytes: int = DEFAULT_MAX_BYTES
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        """Every value range-checked when the settings are built (flags, YAML, saved JSON)."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"processor setting {name} = {getattr(self, name)!r}: {rule}")

        def number(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("min_pixels", "max_pixels", "max_slices", "max_visual_tokens",
                     "max_video_frames", "max_bytes"):  # fmt: skip
            if (
                not number(name)
                or int(getattr(self, name)) != getattr(self, name)
                or getattr(self, name) < 1
            ):
                raise bad(name, "must be a positive integer")
        if self.min_pixels > self.max_pixels:
            raise bad("min_pixels", f"must not exceed max_pixels = {self.max_pixels}")
        if self.video_fps is not None and (not number("video_fps") or self.video_fps <= 0):
            raise bad("video_fps", "must be a positive number of frames per second (or None)")
        if self.video_frames is not None and (
            not number("video_frames") or int(self.video_frames) != self.video_frames
            or self.video_frames < 1
        ):  # fmt: skip
            raise bad("video_frames", "must be a positive integer (or None)")
        if self.prune_threshold is not None and (
            not number("prune_threshold") or self.prune_threshold < 0
        ):
            raise bad("prune_threshold", "must be a finite number >= 0 (or None)")
        for name in ("image_mean", "image_std"):
            values = tuple(getattr(self, name))
            if len(values) != 3 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values
            ):
                raise bad(name, "must be three finite numbers")
        if min(self.image_std) <= 0:
            raise bad("image_std", "must be positive")

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
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        for key in ("image_mean", "image_std"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


PROCESSOR_CONFIG_NAME = "processor_config.json"


@dataclass
class Media:
    kind: VisualKind
    path: str | Path | list
    options: dict[str, Any] | None = None  # per-sample: ct_window, start, end, ...


class OmniVMedProcessor:
    def __init__(
        self, config: OmniVMedConfig, tokenizer, options: ProcessorOptions | None = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.options = options or ProcessorOptions()
        self.parts = ModelParts.of(config)
        self.multiple = config.vision_config.patch_size * self.parts.grid_multiple(config)
        # An encoder with a fixed input size (stock SigLIP) gets every frame at that size.
        self.fixed_size = self.parts.encoder.fixed_input_size(config.vision_config)
        if self.fixed_size is not None and any(side % self.multiple for side in self.fixed_size):
            raise ValueError(
                f"vision encoder {config.vision_encoder!r} takes {self.fixed_size[0]}x"
                f"{self.fixed_size[1]} frames, which are not multiples of {self.multiple} "
                f"(patch size x the connector's/pruning's block size)"
            )

    # ---- media -------------------------------------------------------------------------
    def load(self, media: Media) -> VisualItem:
        """Read and normalize one item into encoder-ready frames `[F, C, H, W]`."""
        o, extra = self.options, media.options or {}
        channels = self.config.vision_config.num_channels
        if media.kind == VisualKind.IMAGE:
            frames01 = read_image(media.path, o.max_bytes)[None]
        elif media.kind == VisualKind.VIDEO:
            video = read_video(
                media.path, sample_fps=None if o.video_frames else o.video_fps, num_frames=o.video_frames,
                start=extra.get("start"), end=extra.get("end"), max_frames=o.max_video_frames, max_bytes=o.max_bytes,
            )  # fmt: skip
            frames01 = video.frames
        else:
            volume = read_volume(media.path, o.max_bytes)
            data = volume.data[uniform_indices(volume.data.shape[0], o.max_slices)]
            frames01 = volume_to_unit_range(
                data, volume.modality, extra.get("ct_window", o.ct_window), volume.source
            )
        frames = to_encoder_input(frames01, o.image_mean, o.image_std, channels)
        if self.fixed_size is not None:
            height, width = self.fixed_size
        else:
            height, width = snap_size(
                frames.shape[-2], frames.shape[-1], self.multiple, o.min_pixels, o.max_pixels
            )
        frames = resize_frames(frames, (height, width))
        volume3d = None
        if self.parts.uses_volume_3d(media.kind):
            volume01 = torch.as_tensor(frames01 if frames01.ndim == 3 else frames01[..., 0])
            volume3d = self.parts.volume.prepare_volume(self.config, volume01)
        return VisualItem(media.kind, frames, volume3d=volume3d)

    def _fit_token_cap(self, items: list[VisualItem]) -> list[VisualItem]:
        """Subsample long videos and big volumes (evenly, whole frames) so the sample's
        unpruned visual tokens fit the cap; never cut an item short."""
        cap = self.options.max_visual_tokens
        ps = self.config.vision_config.patch_size

        def tokens(item):
            f, _, h, w = item.frames.shape
            return visual_token_count(self.config, item.kind, f, h // ps, w // ps)

        total = sum(tokens(i) for i in items)
        if total <= cap:
            return items

        # Items whose token count grows with their frames (pruned/rotary volumes, videos) are
        # thinned; fixed-cost items (slice_avg, slice_attn, encoder3d, a resampler) are not.
        # Smaller demands are served first, so budget they leave passes to the others.
        def grows(item):
            f = item.frames.shape[0]
            return f > 1 and tokens(VisualItem(item.kind, item.frames[:1])) * f == tokens(item)

        remaining = cap - sum(tokens(i) for i in items if not grows(i))
        growing = sorted(
            (i for i, item in enumerate(items) if grows(item)), key=lambda i: tokens(items[i])
        )
        out = list(items)
        for n_left, i in zip(range(len(growing), 0, -1), growing, strict=True):
            item = items[i]
            per_frame = tokens(VisualItem(item.kind, item.frames[:1]))
            keep = frames_within_token_cap(
                item.frames.shape[0], per_frame, max(remaining // n_left, per_frame)
            )
            out[i] = VisualItem(
                item.kind, item.frames[uniform_indices(item.frames.shape[0], keep)], item.volume3d
            )
            remaining -= keep * per_frame
        if sum(tokens(i) for i in out) > cap:
            raise ValueError(
                f"the sample's images alone give more than max_visual_tokens = {cap} tokens"
            )
        return out

    # ---- samples -----------------------------------------------------------------------
    def __call__(self, conversations: list[dict], media: list[Media], sample_id: str = "?",
                 prune: bool | None = None) -> dict[str, Any]:  # fmt: skip
        """-> {"input_ids", "labels", "visual": VisualBatch, "id"}."""
        messages = to_messages(conversations, sample_id)
        try:
            items = [self.load(m) for m in media]
        except MediaError as exc:
            raise exc.for_sample(sample_id) from exc
        items = self._fit_token_cap(items)
        prune = self.options.prune if prune is None else prune
        visual: VisualBatch = pack_visual_items(
            items, self.config, prune=prune, threshold=self.options.prune_threshold
        )
        messages = expand_markers(messages, visual.token_counts, self.config.image_token, sample_id)
        input_ids, labels = tokenize_conversation(self.tokenizer, messages)
        return {"id": sample_id, "input_ids": input_ids, "labels": labels, "visual": visual}
