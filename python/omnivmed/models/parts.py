"""What a part is: the questions every vision encoder, connector and volume strategy
answers about itself, and the one place that asks them for a whole configuration.

A part is one class in one file, registered by name (`registry.py`). The model, the token
counts, the processor, the builder and the stage-config checks go through `ModelParts`
and the class attributes below; nothing outside a part compares part names. Adding a part
is writing one class (see `tests/test_parts.py`, which adds two without touching the
package).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .kinds import VisualKind
from .registry import CONNECTORS, ENCODERS, VOLUME_STRATEGIES

if TYPE_CHECKING:
    from .configuration import OmniVMedConfig, OmniVMedVisionConfig


class VisionEncoder:
    """A 2D vision encoder over packed patches (mixed into an `nn.Module`).

    `forward(patches [L, P], positions [L, 3] int32 (t, h, w), cu_seqlens int32 [B+1])`
    returns features `[L, hidden]`; constructed as `cls(config.vision_config)`.
    """

    registered_name: ClassVar[str]
    # Whether an item may arrive with some of its patches pruned away.
    supports_pruning: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        """Raise if the encoder cannot work with `config` (called when the config is built)."""

    @classmethod
    def fixed_input_size(cls, vision_config: OmniVMedVisionConfig) -> tuple[int, int] | None:
        """(height, width) every frame is resized to, or None for native resolution."""
        return None

    @classmethod
    def vision_config_from_pretrained(
        cls, hf_config: Any, **overrides: Any
    ) -> OmniVMedVisionConfig:
        """The vision config for a checkpoint's own config (an encoder that loads
        checkpoints says how it reads theirs)."""
        raise NotImplementedError(f"vision encoder {cls.registered_name!r} loads no checkpoints")

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        """Load a checkpoint directory; returns {"loaded", "skipped", "missing"} key lists."""
        raise NotImplementedError(f"vision encoder {self.registered_name!r} loads no checkpoints")


class Connector:
    """Visual features -> LLM embeddings (mixed into an `nn.Module`).

    `forward(features [L, Dv], positions [L, 3], cu_seqlens [I+1])` returns
    `(tokens [L', Dt], new_cu_seqlens)`; constructed as `cls(config)`.
    """

    registered_name: ClassVar[str]
    # Frame sides (in patches) must be multiples of this, and pruning must keep whole
    # blocks of it (2 for a 2x2 merge).
    grid_unit: ClassVar[int] = 1
    # Whether the input must be whole patch grids with their positions (a spatial merge
    # cannot follow a strategy that compresses a volume to free tokens).
    needs_patch_grid: ClassVar[bool] = False

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        """LLM tokens for an item that reaches the connector as `features` features."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        """Raise if the connector cannot work with `config`."""
        if config.prune_unit % cls.grid_unit:
            raise ValueError(
                f"connector {cls.registered_name!r} merges {cls.grid_unit}x{cls.grid_unit} "
                f"blocks, so pruning must keep whole blocks: prune_unit must be a multiple of "
                f"{cls.grid_unit}, got {config.prune_unit}"
            )


class VolumeInput(Enum):
    """What a volume strategy takes from the processor."""

    SLICES = "slices"  # the slices as frames of 2D patches, through the vision encoder
    VOLUME_3D = "volume3d"  # one fixed-size [C, D, H, W] volume in [0, 1]


@dataclass
class VolumeItem:
    """One volume as a strategy receives it: the vision encoder's features of its kept
    patches and their positions (SLICES), or the resampled volume (VOLUME_3D)."""

    frames: int
    grid_h: int
    grid_w: int
    features: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    volume: torch.Tensor | None = None


class VolumeStrategy:
    """How a 3D volume becomes features for the connector (mixed into an `nn.Module`).

    Constructed as `cls(config)` and kept on the model under `module_name`, which is also
    the name a stage config's `trainable` list uses for its parameters.
    """

    registered_name: ClassVar[str]
    module_name: ClassVar[str] = "volume_module"
    input: ClassVar[VolumeInput] = VolumeInput.SLICES
    # Whether slices may be pruned (only a strategy that sees the kept tokens themselves).
    allows_pruning: ClassVar[bool] = False
    # Whether the vision encoder sees one slice at a time (else the whole stack jointly).
    encodes_slices_separately: ClassVar[bool] = False
    # Whether the output is a grid of patches with true positions (see Connector).
    outputs_patch_grid: ClassVar[bool] = True

    @classmethod
    def feature_count(
        cls, config: OmniVMedConfig, frames: int, grid_h: int, grid_w: int, kept: int
    ) -> int:
        """Features handed to the connector for a volume of `frames` x (grid_h x grid_w)
        patches of which `kept` survived pruning."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: OmniVMedConfig) -> None:
        """Raise if the strategy cannot work with `config`; may fill in its own defaults."""

    @classmethod
    def prepare_volume(cls, config: OmniVMedConfig, volume01: torch.Tensor) -> torch.Tensor:
        """VOLUME_3D strategies: `[D, H, W]` intensities in [0, 1] -> the encoder's input."""
        raise NotImplementedError(f"volume strategy {cls.registered_name!r} takes slices")

    @classmethod
    def pretrained_config_overrides(
        cls, path: Path, config_overrides: dict[str, Any]
    ) -> dict[str, Any]:
        """`OmniVMedConfig` fields to take from a checkpoint of the strategy's own weights
        (`build_model(volume_encoder=path)`), given the fields asked for so far."""
        raise NotImplementedError(f"volume strategy {cls.registered_name!r} has no weights to load")

    def encode(self, item: VolumeItem) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features `[n, D]`, positions `[n, 3]` int32) of one volume."""
        raise NotImplementedError

    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        raise NotImplementedError(
            f"volume strategy {self.registered_name!r} has no weights to load"
        )


@dataclass(frozen=True)
class ModelParts:
    """The part classes a config names, and the answers that involve more than one."""

    encoder: type[VisionEncoder]
    connector: type[Connector]
    volume: type[VolumeStrategy]

    @classmethod
    def of(cls, config: OmniVMedConfig) -> ModelParts:
        return cls(
            encoder=ENCODERS.get(config.vision_encoder),
            connector=CONNECTORS.get(config.connector),
            volume=VOLUME_STRATEGIES.get(config.volume_strategy),
        )

    def check(self, config: OmniVMedConfig) -> None:
        """Every part's own checks, then the combinations."""
        self.encoder.check_config(config)
        self.volume.check_config(config)
        self.connector.check_config(config)
        if self.connector.needs_patch_grid and not self.volume.outputs_patch_grid:
            raise ValueError(
                f"connector {self.connector.registered_name!r} needs whole patch grids, but "
                f"volume_strategy {self.volume.registered_name!r} compresses a volume to "
                f"tokens without a grid; choose another connector or strategy"
            )

    def may_prune(self, kind: VisualKind) -> bool:
        """Whether an item of `kind` may lose patches to pruning before the encoder."""
        if not self.encoder.supports_pruning:
            return False
        if VisualKind(int(kind)) == VisualKind.VOLUME:
            return self.volume.allows_pruning
        return True

    def uses_volume_3d(self, kind: VisualKind) -> bool:
        return VisualKind(int(kind)) == VisualKind.VOLUME and (
            self.volume.input == VolumeInput.VOLUME_3D
        )

    def grid_multiple(self, config: OmniVMedConfig) -> int:
        """Frame sides (in patches) must be multiples of this."""
        unit = self.connector.grid_unit
        return unit * config.prune_unit // _gcd(unit, config.prune_unit)

    def token_count(
        self,
        config: OmniVMedConfig,
        kind: VisualKind | int,
        frames: int,
        grid_h: int,
        grid_w: int,
        kept: int | None = None,
    ) -> int:
        kept = frames * grid_h * grid_w if kept is None else kept
        if VisualKind(int(kind)) == VisualKind.VOLUME:
            features = self.volume.feature_count(config, frames, grid_h, grid_w, kept)
        else:
            features = kept
        return self.connector.output_length(config, features)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def visual_token_count(
    config: OmniVMedConfig,
    kind: VisualKind | int,
    frames: int,
    grid_h: int,
    grid_w: int,
    kept: int | None = None,
) -> int:
    """LLM tokens for one item of `frames` x (grid_h x grid_w) patches, of which `kept`
    survive pruning (all when None): the number of placeholders its prompt needs."""
    return ModelParts.of(config).token_count(config, kind, frames, grid_h, grid_w, kept)


# The model's fixed slots; volume strategies add their own `module_name`.
MODEL_SLOTS = ("vision_tower", "connector", "language_model")


def trainable_module_names() -> list[str]:
    """Every name a stage config may list in `trainable` / `module_lr`."""
    names = list(MODEL_SLOTS)
    for _, strategy in VOLUME_STRATEGIES.items():
        if strategy.module_name not in names:
            names.append(strategy.module_name)
    return names
