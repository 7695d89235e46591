"""Loading a saved model strictly: the right model type, every weight present, readable
and finite. transformers only warns about missing weights (and initialises them at
random), which would let a broken folder answer questions; here each is an error that
names what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .configuration import OmniVMedConfig
from .modeling import OmniVMedForConditionalGeneration


class ModelLoadError(ValueError):
    """A saved model folder that cannot be used as it is."""


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def load_saved_model(
    path: str | Path, dtype: torch.dtype | None = None
) -> OmniVMedForConditionalGeneration:
    """`OmniVMedForConditionalGeneration.from_pretrained(path)`, refusing a folder whose
    config is another model type, whose weights are missing, unexpected, truncated or
    hold NaN/Inf values."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path}: no saved model here (config.json missing); pass the folder written by "
            f"save_pretrained, e.g. <output>/stage3/final"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{config_file}: not a JSON object ({exc})") from exc
    if model_type != OmniVMedConfig.model_type:
        raise ModelLoadError(
            f"{config_file}: model_type is {model_type!r}, not {OmniVMedConfig.model_type!r}; "
            "this folder holds another kind of model"
        )
    try:
        model, info = OmniVMedForConditionalGeneration.from_pretrained(
            path, dtype=dtype, output_loading_info=True
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors, torch and transformers raise many kinds
        raise ModelLoadError(f"{path}: the saved model cannot be read ({exc})") from exc
    for key, what in (("missing_keys", "lacks weights"), ("unexpected_keys", "has unknown weights"),
                      ("mismatched_keys", "has weights of the wrong shape")):  # fmt: skip
        names = sorted(str(k) for k in info.get(key) or [])
        if names:
            raise ModelLoadError(f"{path}: the checkpoint {what}: {_listing(names)}")
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(f"{path}: non-finite (NaN/Inf) values in weights {_listing(bad)}")
    return model
