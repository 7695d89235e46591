"""Training: stage configs, the DeepSpeed engine loop, checkpoints and metrics."""

from .config import ConfigError, StageConfig, check_stage_order, load_stage_config
from .trainer import train_stage

__all__ = ["ConfigError", "StageConfig", "check_stage_order", "load_stage_config", "train_stage"]
