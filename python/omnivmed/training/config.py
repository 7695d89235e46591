"""Stage configurations (YAML), validated before anything trains."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..models.parts import trainable_module_names
from ..processing.processor import ProcessorOptions
from ..typed_fields import coerce_fields, field_hints, unknown_keys


class ConfigError(ValueError):
    pass


@dataclass
class StageConfig:
    """One training stage. `init` is "preset:<name>" or a directory saved by a previous
    stage ("previous" when run in a chain); `data` a .json/.jsonl file or a YAML mixture.
    `model` changes the preset a first stage builds: `build_model` arguments and model
    config fields, e.g. `{vision_config: {position_encoding: learned}}` (OmniV-Med's
    fixed-position-embedding ablation) or `{volume_strategy: slice_attn}`. `media` is the
    stage's one set of media settings (`ProcessorOptions`: pixel budgets, slice and frame
    budgets, the visual-token cap, pruning, intensity, the sequence limit), saved with the
    exported model for inference."""

    name: str
    stage: int = 1
    init: str = "preset:tiny"
    model: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    data_root: str | None = None
    output_dir: str = ""  # default: runs/<name>
    trainable: list[str] = field(default_factory=lambda: ["vision_tower", "connector"])
    lr: float = 1e-3
    module_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 2
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    offload: bool = False
    gradient_checkpointing: bool = False
    # Pack each micro-batch's samples into one row (position ids restart per sample; no
    # padding computed; the LLM runs varlen attention on CUDA) instead of padding them.
    packing: bool = True
    # DataLoader worker processes that read, decode, prune and tokenize ahead of the step
    # (0: in the training process). None: 0 without a GPU, where loading and the step would
    # share the same cores; with GPUs, up to 8 per GPU from the machine's cores.
    num_workers: int | None = None
    media: ProcessorOptions = field(default_factory=ProcessorOptions)
    save_every: int = 0
    # A resumable checkpoint at the last step too (off only where nothing will resume, as
    # in benchmarks: at the 1.5B shape it writes ~18 GB of optimizer state).
    checkpoint_at_end: bool = True
    keep_last: int = 2
    seed: int = 0
    on_error: str = "raise"
    lora: dict[str, Any] | None = None  # e.g. {r: 16, alpha: 32, dropout: 0.05}

    def __post_init__(self) -> None:
        # Values from YAML and --set are converted and checked by their fields' types
        # first (PyYAML reads 1e-3 as a string; `media` arrives as a mapping and gets
        # ProcessorOptions' own checks), so the range checks below see numbers.
        try:
            coerce_fields(self)
        except ValueError as exc:
            raise ConfigError(f"stage {self.name!r}: {exc}") from None
        if not self.output_dir:
            self.output_dir = f"runs/{self.name}"
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(
                f"stage {self.name!r}: max_steps must be positive, got {self.max_steps}"
            )
        if self.keep_last < 1:
            raise ConfigError(
                f"stage {self.name!r}: keep_last must be at least 1, got {self.keep_last}"
            )
        known = trainable_module_names()  # the model's slots and every strategy's module
        unknown = [m for m in self.trainable + list(self.module_lr) if m not in known]
        if unknown:
            raise ConfigError(f"stage {self.name!r}: unknown modules {unknown}; known: {known}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"stage {self.name!r}: zero_stage must be 0-3, got {self.zero_stage}")
        for key in ("lr", "epochs", "micro_batch_size", "grad_accum"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"stage {self.name!r}: {key} must be positive and finite, got {value}"
                )
        for module, value in self.module_lr.items():
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"stage {self.name!r}: module_lr[{module!r}] must be positive and finite, got {value}"
                )
        for key in ("weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"stage {self.name!r}: {key} must be finite and >= 0, got {value}"
                )
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(
                f"stage {self.name!r}: num_workers must be >= 0, got {self.num_workers}"
            )
        if self.save_every < 0:
            raise ConfigError(
                f"stage {self.name!r}: save_every must be >= 0, got {self.save_every}"
            )
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ConfigError(
                f"stage {self.name!r}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
            )
        if self.lora is not None:
            bad = sorted(set(self.lora) - {"r", "alpha", "dropout", "target_modules"})
            if bad:
                raise ConfigError(
                    f"stage {self.name!r}: unknown lora keys {bad}; allowed: r, alpha, dropout, target_modules"
                )
        if self.model:
            if not self.init.startswith("preset:"):
                raise ConfigError(
                    f"stage {self.name!r}: `model` settings change a preset, but init is "
                    f"{self.init!r}; a saved model keeps the architecture it was trained with"
                )
            allowed = model_setting_names()
            bad = sorted(set(self.model) - allowed)
            if bad:
                raise ConfigError(
                    f"stage {self.name!r}: unknown model settings {bad}; allowed: {sorted(allowed)}"
                )
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"stage {self.name!r}: on_error must be 'raise' or 'skip'")

    @property
    def allowed_keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]


def model_setting_names() -> set[str]:
    """What a stage's `model` mapping may set: `build_model`'s arguments and the model
    config's fields."""
    import inspect

    from ..models import OmniVMedConfig, build_model

    names = set(inspect.signature(build_model).parameters) | set(
        inspect.signature(OmniVMedConfig.__init__).parameters
    )
    return names - {"self", "kwargs", "config_overrides", "tokenizer", "text_config"}


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML ({where}{what})"


def load_stage_config(path: str | Path, **overrides: Any) -> StageConfig:
    """Read and validate a stage YAML; `overrides` (e.g. from the command line) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stage config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = unknown_keys(StageConfig, raw)
    if unknown:
        media_keys = [k for k in unknown if k in field_hints(ProcessorOptions)]
        hint = f" ({', '.join(media_keys)} go under `media:`)" if media_keys else ""
        allowed = sorted(field_hints(StageConfig))
        raise ConfigError(f"{path}: unknown keys {unknown}{hint}; allowed keys: {allowed}")
    raw.setdefault("name", path.stem)
    try:
        return StageConfig(**raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def check_data(cfg: StageConfig) -> None:
    if not cfg.data:
        raise ConfigError(f"stage {cfg.name!r}: no data file given")
    if not Path(cfg.data).is_file():
        raise ConfigError(f"stage {cfg.name!r}: data file {cfg.data} does not exist")


def check_records(cfg: StageConfig) -> None:
    """The stage's data file, or every file of its mixture, read and every record checked
    (not the media), so a bad record stops a run before a model, DeepSpeed or an output
    folder is set up, and before an earlier stage trains. Under on_error=skip only what
    fails a whole file remains an error here."""
    from ..data.mixture import entry_records, read_spec
    from ..data.records import load_records

    check_data(cfg)
    path = Path(cfg.data)
    # Training reads the files again and reports skipped records then, once.
    with _quiet("omnivmed.data"):
        if path.suffix in (".yaml", ".yml"):
            try:
                _, entries = read_spec(path)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
            for k, entry in enumerate(entries):
                entry_records(path, k, entry, cfg.on_error)
        else:
            load_records(path, cfg.data_root, cfg.on_error)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_stage_order(stages: list[StageConfig]) -> None:
    """Stages must run in increasing order, and only the first may start from a preset
    unless a later one names its own checkpoint."""
    numbers = [s.stage for s in stages]
    if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
        raise ConfigError(f"stages must run in increasing order without repeats, got {numbers}")
    if stages and stages[0].init == "previous":
        raise ConfigError(
            f"stage {stages[0].name!r} starts from 'previous' but no stage runs before it"
        )
