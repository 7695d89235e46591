"""The rotary vision tower: SigLIP's encoder with (t, h, w) rotary positions.

It runs on packed, possibly pruned patches: `patches [L, P]` (P = C*ps*ps values in
(channel, row, column) order), their `positions [L, 3]` and the items' `cu_seqlens`. The
patch embedding is SigLIP's convolution written as a linear map, and there is no learned
position embedding: every attention layer rotates q and k by the token's true position,
so any resolution, any number of slices or frames, and any subset of kept tokens work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

import omnivmed_ext

from .attention import frame_cu_seqlens, varlen_rotary_attention
from .configuration import OmniVMedVisionConfig
from .registry import ENCODERS

logger = logging.getLogger(__name__)


class VisionAttention(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden, positions, cu_seqlens, max_seqlen):
        length = hidden.shape[0]
        shape = (length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden).view(shape)
        k = self.k_proj(hidden).view(shape)
        v = self.v_proj(hidden).view(shape)
        out = varlen_rotary_attention(
            q, k, v, positions, cu_seqlens, max_seqlen,
            self.config.rope_sections, self.config.rope_theta,
            self.config.attention_dropout if self.training else 0.0,
            check_seqlens=False,  # the tower checked the pack once
        )  # fmt: skip
        return self.out_proj(out.reshape(length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden, positions, cu_seqlens, max_seqlen):
        hidden = hidden + self.self_attn(
            self.layer_norm1(hidden), positions, cu_seqlens, max_seqlen
        )
        return hidden + self.mlp(self.layer_norm2(hidden))


@ENCODERS.register("rotary_siglip")
class RotaryVisionTower(nn.Module):
    """SigLIP vision encoder with rotary (t, h, w) positions over packed items."""

    def __init__(self, config: OmniVMedVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_values, config.hidden_size)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        patches: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """patches `[L, P]`, positions `[L, 3]`, cu_seqlens int32 `[B+1]` -> `[L, hidden]`."""
        if patches.dim() != 2 or patches.shape[1] != self.config.patch_values:
            raise ValueError(
                f"vision tower: patches must be [L, {self.config.patch_values}] (C*ps*ps = "
                f"{self.config.num_channels}*{self.config.patch_size}*{self.config.patch_size}), "
                f"got {tuple(patches.shape)}"
            )
        if positions.shape != (patches.shape[0], 3):
            raise ValueError(
                f"vision tower: positions must be [{patches.shape[0]}, 3], got {tuple(positions.shape)}"
            )
        if self.config.attention_scope == "frame":
            cu_seqlens = frame_cu_seqlens(positions, cu_seqlens)
            max_seqlen = None
        if max_seqlen is None:
            max_seqlen = int(torch.diff(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0
        if not torch.compiler.is_compiling():
            omnivmed_ext.attention.validate_cu_seqlens(cu_seqlens, patches.shape[0], max_seqlen)
        hidden = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(
                    layer, hidden, positions, cu_seqlens, max_seqlen, use_reentrant=False
                )
            else:
                hidden = layer(hidden, positions, cu_seqlens, max_seqlen)
        return self.post_layernorm(hidden)


_VISION_ROOTS = ("embeddings", "encoder", "post_layernorm", "head")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")


def load_siglip_weights(
    tower: RotaryVisionTower, checkpoint_dir: str | Path
) -> dict[str, list[str]]:
    """Load a SigLIP checkpoint directory (a `SiglipVisionModel` or a full `SiglipModel`
    saved with transformers) into the tower.

    Every vision weight loads except the learned absolute position embedding (replaced by
    rotary) and the attention-pooling head (unused); those and the text tower are
    reported as skipped. Returns {"loaded", "skipped", "missing"} key lists and logs them.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"SigLIP checkpoint directory {path} does not exist")
    state = _read_state_dict(path)
    has_text_tower = any(k.startswith("text_model.") or ".text_model." in k for k in state)
    ours = tower.state_dict()
    loaded, skipped, new_state = [], [], {}
    for key, value in state.items():
        if "vision_model." in key:  # a full SiglipModel, or a checkpoint saved with a prefix
            name = key.split("vision_model.", 1)[1]
        elif key.split(".", 1)[0] in _VISION_ROOTS and not has_text_tower:  # a SiglipVisionModel
            name = key
        else:
            skipped.append(key)
            continue
        if name.startswith("embeddings.patch_embedding."):
            target = name.replace("embeddings.patch_embedding.", "patch_embedding.")
            if target.endswith("weight") and value.dim() == 4:
                value = value.reshape(value.shape[0], -1)  # conv [out, C, ps, ps] -> linear
        elif name.startswith("encoder.layers."):
            target = name.replace("encoder.layers.", "layers.")
        elif name.startswith("post_layernorm."):
            target = name
        else:  # position embedding, pooling head
            skipped.append(key)
            continue
        if target not in ours:
            skipped.append(key)
            continue
        if ours[target].shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but the tower's {target} is "
                f"{tuple(ours[target].shape)}; is the vision config the checkpoint's?"
            )
        new_state[target] = value
        loaded.append(target)
    missing = sorted(set(ours) - set(new_state))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks vision weights {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    tower.load_state_dict(new_state)
    logger.info(
        "loaded %d SigLIP weights from %s; skipped %d: %s", len(loaded), path, len(skipped), skipped
    )
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
