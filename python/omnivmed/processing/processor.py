"""The processor: media files and a conversation -> model inputs with exact placeholder
counts. One place that ties reading, intensity, resizing, patchify + prune, the token cap
and prompts; training, `omnivmed-infer`, `omnivmed-eval`, `omnivmed-serve` and the Python
inference API all go through `encode_media`, so they see the same visual tokens for the
same file and settings.

A processor saves itself next to its model (`save_pretrained`: the tokenizer and
`processor_config.json`) and is read back from there (`from_pretrained`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.configuration import OmniVMedConfig
from ..models.kinds import VisualKind
from ..models.parts import ModelParts
from .errors import MediaError, sample_prefix
from .intensity import to_encoder_input, to_unit_range
from .options import MODEL_SECTION, PROCESSOR_CONFIG_NAME, ProcessorOptions
from .prompt import expand_markers, to_messages, tokenize_conversation
from .readers import read_image, read_video, read_volume
from .resize import resize_frames, resize_frames_pil_bicubic, snap_size, uniform_indices
from .visual_batch import VisualBatch, VisualItem, pack_visual_items

__all__ = ["PROCESSOR_CONFIG_NAME", "Media", "OmniVMedProcessor", "ProcessorOptions", "ReadMedium"]

# The model's config fields a processor leaves out: the LLM's own config decides no visual
# token, and transformers' bookkeeping (the version, the dtype and attention kernel a model
# happens to be loaded with, where it was loaded from, the class's own model type) says
# nothing about processing.
_NOT_PROCESSING = {"self", "kwargs", "text_config", "transformers_version", "dtype", "torch_dtype",
                   "_name_or_path", "architectures", "_attn_implementation",
                   "_attn_implementation_autoset", "_commit_hash", "model_type"}  # fmt: skip


def _plain(value: Any) -> Any:
    """A config value as JSON holds it (sub-configs as their non-default fields)."""
    if hasattr(value, "to_diff_dict"):
        return {k: v for k, v in value.to_diff_dict().items() if k not in _NOT_PROCESSING}
    return json.loads(json.dumps(value))


def processing_config(config: OmniVMedConfig) -> dict[str, Any]:
    """What a processor takes from a model config: every field `OmniVMedConfig` is built
    from but the LLM's config (the parts, their settings, the vision configs, the
    placeholder). Read from the constructor, so a field added there is saved too."""
    names = inspect.signature(OmniVMedConfig.__init__).parameters
    return {n: _plain(getattr(config, n)) for n in names if n not in _NOT_PROCESSING}


def _difference(saved: Any, current: Any, where: str) -> str | None:
    """The first field where two processing configs differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _difference(saved.get(key), current.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    if saved != current:
        return f"{where} is {saved!r} here but {current!r} in the model's config"
    return None


@dataclass
class Media:
    kind: VisualKind
    path: str | Path | list
    options: dict[str, Any] | None = None  # per medium: intensity, ct_window, start, end


@dataclass
class ReadMedium:
    """One medium read into [0, 1] at native resolution: `frames01` `[F, H, W]` or
    `[F, H, W, C]`, the resampled volume of a whole-volume strategy, the frames' t."""

    kind: VisualKind
    frames01: np.ndarray
    volume3d: torch.Tensor | None
    t_values: list[int] | None
    source: str


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

    def with_options(self, options: ProcessorOptions) -> OmniVMedProcessor:
        """The same model config and tokenizer, reading media with other settings."""
        return OmniVMedProcessor(self.config, self.tokenizer, options)

    # ---- saving ------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """The tokenizer's files and `processor_config.json` (every media setting, and
        what the processor takes from the model config) in `folder`, as
        `from_pretrained` reads them back. Returns the config file's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        data = {**dataclasses.asdict(self.options), MODEL_SECTION: processing_config(self.config)}
        path = folder / PROCESSOR_CONFIG_NAME
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, config: OmniVMedConfig | None = None
    ) -> OmniVMedProcessor:
        """The processor `save_pretrained` wrote in `folder`. `config`: the config of the
        model it serves, which must agree with the saved one (a processor saved with
        another model is an error naming the field). A folder written before processors
        saved themselves (no processor_config.json, or one of media settings only) takes
        the model's config (`config`, else the folder's config.json) and its saved media
        settings, or the defaults when it has none."""
        from transformers import AutoTokenizer

        from ..models.loading import ModelLoadError

        folder = Path(folder)
        path = folder / PROCESSOR_CONFIG_NAME
        options = ProcessorOptions.from_dir(folder)  # media settings, old files included
        saved = json.loads(path.read_text()).get(MODEL_SECTION) if path.is_file() else None
        if saved is not None:
            if not isinstance(saved, dict):
                raise ModelLoadError(f"{path}: {MODEL_SECTION} must be an object, got {saved!r}")
            if config is None:
                try:
                    config = OmniVMedConfig(**saved)
                except (TypeError, ValueError, KeyError) as exc:
                    raise ModelLoadError(
                        f"{path}: {MODEL_SECTION} is not a usable config ({exc})"
                    ) from exc
            else:
                found = _difference(saved, processing_config(config), MODEL_SECTION)
                if found:
                    raise ModelLoadError(f"{path}: saved with another model: {found}")
        elif config is None:
            if not (folder / "config.json").is_file():
                raise ModelLoadError(
                    f"{folder}: no processor here (neither {PROCESSOR_CONFIG_NAME} with its "
                    f"{MODEL_SECTION} nor the model's config.json)"
                )
            config = OmniVMedConfig.from_pretrained(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # a folder without its tokenizer files
            raise ModelLoadError(f"{folder}: the tokenizer cannot be loaded ({exc})") from exc
        return cls(config, tokenizer, options)

    # ---- media -------------------------------------------------------------------------
    def read(self, media: Media) -> ReadMedium:
        """Read one medium into [0, 1] at native resolution, after the slice/frame budget."""
        o, extra = self.options, media.options or {}
        mode = extra.get("intensity", o.intensity)
        t_values = None
        if media.kind == VisualKind.IMAGE:
            frames01 = read_image(media.path, o.max_bytes)[None]
            source = str(media.path)
        elif media.kind == VisualKind.VIDEO:
            video = read_video(
                media.path, sample_fps=None if o.video_frames else o.video_fps, num_frames=o.video_frames,
                start=extra.get("start"), end=extra.get("end"), max_frames=o.max_video_frames, max_bytes=o.max_bytes,
                max_seconds=o.max_read_seconds,
            )  # fmt: skip
            frames01, source = video.frames, video.source
            if o.true_positions:
                if not video.timed:
                    raise MediaError(
                        source, "true_positions needs frame times, but a folder or list of frame "
                        "images has none; give a video file or turn true_positions off"
                    )  # fmt: skip
                t_values = self._positions(np.asarray(video.timestamps), o.seconds_per_t,
                                           "seconds_per_t", source)  # fmt: skip
        else:
            volume = read_volume(media.path, o.max_bytes, o.max_read_seconds)
            keep = uniform_indices(volume.data.shape[0], o.max_slices)
            window = extra.get("ct_window", o.ct_window)
            frames01 = to_unit_range(
                volume.data[keep], volume.modality, mode, window, volume.source
            )
            source = volume.source
            if o.true_positions:
                if volume.slice_positions is None:
                    raise MediaError(
                        source, "true_positions needs slice positions, but this file does not "
                        "record them (a NumPy array, or DICOM without ImagePositionPatient)"
                    )  # fmt: skip
                t_values = self._positions(
                    volume.slice_positions[keep], o.mm_per_t, "mm_per_t", source
                )
        volume3d = None
        if self.parts.uses_volume_3d(media.kind):
            gray = frames01 if frames01.ndim == 3 else frames01.mean(axis=-1)
            volume3d = self.parts.volume.prepare_volume(self.config, torch.as_tensor(gray))
        return ReadMedium(media.kind, frames01, volume3d, t_values, source)

    @staticmethod
    def _positions(where: np.ndarray, unit: float, setting: str, source: str) -> list[int]:
        """Times or slice positions -> integer t from the first, in `unit`s; distinct."""
        t = np.round((where - where[0]) / unit).astype(np.int64)
        if len(t) > 1 and np.any(np.diff(t) <= 0):
            raise MediaError(
                source, f"{setting} = {unit} puts two sampled frames at one t (t = {t.tolist()}); "
                f"lower {setting}"
            )  # fmt: skip
        return t.tolist()

    def to_item(
        self, medium: ReadMedium, frames: list[int] | None = None, max_pixels: int | None = None
    ) -> VisualItem:
        """Encoder-ready frames `[F, C, H, W]` of the chosen frames at a pixel budget
        (`max_pixels`, default the options'; a fixed-size encoder takes its own size)."""
        o = self.options
        frames = list(range(medium.frames01.shape[0])) if frames is None else frames
        frames01 = medium.frames01[frames]
        if self.fixed_size is not None:
            size = self.fixed_size
        else:
            budget = o.max_pixels if max_pixels is None else max_pixels
            height, width = frames01.shape[1:3]
            size = snap_size(height, width, self.multiple, min(o.min_pixels, budget), budget)
        channels = self.config.vision_config.num_channels
        t_values = None if medium.t_values is None else [medium.t_values[i] for i in frames]
        if o.resize == "pil_bicubic":
            resized = resize_frames_pil_bicubic(frames01, size)
            x = to_encoder_input(resized, o.image_mean, o.image_std, channels)
            return VisualItem(medium.kind, x, medium.volume3d, t_values)
        x = to_encoder_input(frames01, o.image_mean, o.image_std, channels)
        return VisualItem(medium.kind, resize_frames(x, size), medium.volume3d, t_values)

    def load(self, media: Media) -> VisualItem:
        """Read one medium into encoder-ready frames at the full pixel budget."""
        return self.to_item(self.read(media))

    def encode_media(
        self, media: list[Media], sample_id: str | None = None, prune: bool | None = None
    ) -> VisualBatch:
        """Read, size and prune a sample's media so its visual tokens *after pruning* fit
        `max_visual_tokens`: over the cap, the pixel budget shrinks first (frames stay
        consecutive, so pruning keeps working), then frames are thinned evenly, pruning
        again after every step. An error when even one frame per item at `min_pixels` is
        too many."""
        try:
            read = [self.read(m) for m in media]
        except MediaError as exc:
            raise exc.for_sample(sample_id) from exc
        o = self.options
        cap = o.max_visual_tokens
        chosen = [list(range(r.frames01.shape[0])) for r in read]
        budget = o.max_pixels
        while True:
            items = [self.to_item(r, c, budget) for r, c in zip(read, chosen, strict=True)]
            batch = pack_visual_items(items, self.config, o, prune, self.parts)
            total = sum(batch.token_counts)
            if total <= cap:
                return batch
            ratio = cap / total
            if self.fixed_size is None and budget > o.min_pixels:
                # Tokens scale with pixels: aim just under the cap, and shrink by 10% at least.
                budget = max(o.min_pixels, min(int(budget * ratio * 0.95), int(budget * 0.9)))
                continue
            thinnable = [
                i for i, item in enumerate(items) if len(chosen[i]) > 1 and self._grows(item)
            ]
            if not thinnable:
                where = sample_prefix(sample_id) or f"{', '.join(r.source for r in read)}: "
                raise ValueError(
                    f"{where}{total} visual tokens after pruning exceed "
                    f"max_visual_tokens = {cap} even at min_pixels = {o.min_pixels} with "
                    f"{[len(c) for c in chosen]} frames per item; raise max_visual_tokens, "
                    f"lower min_pixels or give fewer media"
                )
            for i in thinnable:
                keep = max(1, min(len(chosen[i]) - 1, math.floor(len(chosen[i]) * ratio)))
                chosen[i] = [chosen[i][j] for j in uniform_indices(len(chosen[i]), keep)]

    def _grows(self, item: VisualItem) -> bool:
        """Whether fewer frames of this item give fewer tokens (not so for fixed-cost
        strategies and connectors)."""
        f, _, h, w = item.frames.shape
        ps = self.config.vision_config.patch_size
        count = lambda n: self.parts.token_count(self.config, item.kind, n, h // ps, w // ps)  # noqa: E731
        return count(f) > count(1)

    # ---- samples -----------------------------------------------------------------------
    def __call__(self, conversations: list[dict], media: list[Media], sample_id: str | None = None,
                 prune: bool | None = None) -> dict[str, Any]:  # fmt: skip
        """-> {"input_ids", "labels", "visual": VisualBatch, "id"}."""
        messages = to_messages(conversations, sample_id)
        visual = self.encode_media(media, sample_id, prune)
        messages = expand_markers(messages, visual.token_counts, self.config.image_token, sample_id)
        input_ids, labels = tokenize_conversation(self.tokenizer, messages, self.config.image_token)
        self.check_length(len(input_ids), sum(visual.token_counts), sample_id)
        return {"id": sample_id, "input_ids": input_ids, "labels": labels, "visual": visual}

    def check_length(self, tokens: int, visual: int, sample_id: str | None = None) -> None:
        """A sequence over `max_sequence_length` is an error (skipped and counted under
        on_error=skip), never truncated."""
        limit = self.options.max_sequence_length
        if limit is not None and tokens > limit:
            raise ValueError(
                f"{sample_prefix(sample_id)}{tokens} tokens ({visual} visual) exceed "
                f"max_sequence_length = {limit}"
            )
