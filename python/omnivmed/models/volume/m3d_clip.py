"""Loading M3D-CLIP's 3D vision encoder (and the same ViT inside M3D-LaMed or MedM-VL
checkpoints) into `Encoder3D`.

M3D's ViT is built from MONAI 1.3 blocks: a "perceptron" patch embedding (voxels of a
patch flattened depth, row, column, channel-fastest, then a linear map), a learned
position embedding `[1, N, D]`, a class token (no position embedding) prepended, pre-norm
blocks with a fused bias-free qkv projection, exact GELU and LayerNorm eps 1e-5, and a
final LayerNorm. Its input is `[B, 1, 32, 256, 256]` (C, D, H, W) scaled to [0, 1].
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..configuration import OmniVMedEncoder3DConfig
from ..weights import read_state_dict

logger = logging.getLogger(__name__)

_POSITION_KEY = "patch_embedding.position_embeddings"
# M3D-CLIP's config fields (M3DCLIPConfig) and their defaults.
_M3D_DEFAULTS = dict(
    in_channels=1, img_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=768,
    mlp_dim=3072, num_layers=12, num_heads=12,
)  # fmt: skip


def m3d_encoder3d_config(
    checkpoint_dir: str | Path | None = None, **overrides: Any
) -> OmniVMedEncoder3DConfig:
    """The `Encoder3D` config of M3D's ViT, from a checkpoint's `config.json` where it has
    one (M3D-CLIP's field names), else M3D's published defaults; `overrides` win (e.g.
    `pool=[2, 2, 2]`, `final_norm=False`)."""
    values = dict(_M3D_DEFAULTS)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "config.json").is_file():
        path = Path(checkpoint_dir) / "config.json"
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        values.update({k: saved[k] for k in _M3D_DEFAULTS if k in saved})
    config = dict(
        hidden_size=values["hidden_size"], intermediate_size=values["mlp_dim"],
        num_hidden_layers=values["num_layers"], num_attention_heads=values["num_heads"],
        num_channels=values["in_channels"], volume_size=list(values["img_size"]),
        patch_size_3d=list(values["patch_size"]), hidden_act="gelu", layer_norm_eps=1e-5,
        cls_token=True,
    )  # fmt: skip
    config.update(overrides)
    return OmniVMedEncoder3DConfig(**config)


def _find_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    prefixes = {k[: -len(_POSITION_KEY)] for k in state if k.endswith(_POSITION_KEY)}
    if len(prefixes) != 1:
        raise ValueError(
            f"{path}: expected one M3D vision encoder (a key ending in {_POSITION_KEY!r}), "
            f"found {len(prefixes)}{': ' + ', '.join(sorted(prefixes)) if prefixes else ''}"
        )
    return prefixes.pop()


def _target(name: str) -> str | None:
    """M3D/MONAI name (prefix removed) -> our name, or None when it has no counterpart."""
    if name in ("cls_token", "norm.weight", "norm.bias"):
        return name
    if name.startswith("patch_embedding.patch_embeddings."):
        return "patch_embedding." + name.rsplit(".", 1)[1]
    if name == _POSITION_KEY:
        return "position_embedding"
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None:
        return None
    index, rest = match.groups()
    renamed = {
        "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
        "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
        "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
        "mlp.linear1.weight": "fc1.weight", "mlp.linear1.bias": "fc1.bias",
        "mlp.linear2.weight": "fc2.weight", "mlp.linear2.bias": "fc2.bias",
    }.get(rest)  # fmt: skip
    return None if renamed is None else f"blocks.{index}.{renamed}"


def load_m3d_vision_weights(encoder: torch.nn.Module, checkpoint_dir: str | Path) -> dict:
    """Load M3D's ViT weights from a checkpoint directory into `encoder` (an `Encoder3D`).

    The encoder's keys are found under any prefix (`vision_encoder.` in M3D-CLIP,
    `model.vision_tower.vision_tower.` in M3D-LaMed, `encoder_image3d.encoder.vision_encoder.`
    in MedM-VL). Everything else (the text tower, projections, MONAI>=1.4's unused
    cross-attention) is reported as skipped. The qkv projection has no bias in M3D, so
    ours is set to zero and reported under "zero_filled". A shape that does not fit the
    encoder's config is an error naming both. Returns {"loaded", "skipped", "missing",
    "zero_filled"}.
    """
    path = Path(checkpoint_dir)
    state = read_state_dict(path)
    prefix = _find_prefix(state, path)
    config = encoder.config
    ours = encoder.state_dict()
    loaded, skipped, new_state = [], [], {}
    for key, value in state.items():
        target = _target(key[len(prefix) :]) if key.startswith(prefix) else None
        if target == "cls_token" and not config.cls_token:
            raise ValueError(
                f"{path}: the checkpoint's ViT has a class token ({key}) but encoder3d_config "
                f"has cls_token=False; build the config with m3d_encoder3d_config()"
            )
        if target is None or target not in ours:
            skipped.append(key)
            continue
        if target == "position_embedding":
            value = value.reshape(value.shape[-2:]) if value.dim() == 3 else value
        elif target == "patch_embedding.weight" and value.dim() == 5:  # a "conv" embedding
            value = value.reshape(value.shape[0], -1)
        elif target == "patch_embedding.weight":
            # perceptron: columns in (depth, row, column, channel) order; ours channel-first
            pd, ph, pw = config.patch_size_3d
            if value.shape[1] == pd * ph * pw * config.num_channels:
                value = value.reshape(value.shape[0], pd, ph, pw, config.num_channels)
                value = value.permute(0, 4, 1, 2, 3).reshape(value.shape[0], -1)
        if tuple(ours[target].shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but encoder3d's {target} is "
                f"{tuple(ours[target].shape)} (encoder3d_config: hidden_size "
                f"{config.hidden_size}, volume_size {config.volume_size}, patch_size_3d "
                f"{config.patch_size_3d}, channels {config.num_channels}); is the config the "
                f"checkpoint's?"
            )
        new_state[target] = value
        loaded.append(target)
    zero_filled = sorted(k for k in set(ours) - set(new_state) if k.endswith("attn.in_proj_bias"))
    for key in zero_filled:
        new_state[key] = torch.zeros_like(ours[key])
    missing = sorted(set(ours) - set(new_state))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks encoder3d weights {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}"
        )
    encoder.load_state_dict(new_state)
    logger.info(
        "loaded %d M3D vision weights from %s (prefix %r); skipped %d; zero-filled %d",
        len(loaded), path, prefix, len(skipped), len(zero_filled),
    )  # fmt: skip
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "zero_filled": zero_filled}
