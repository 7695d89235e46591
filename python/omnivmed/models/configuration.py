"""Configurations: the rotary vision tower, the 3D encoder, and the whole model."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig

from .parts import ModelParts  # the parts own their names and their rules
from .registry import LLMS

# Rotary sections (t, h, w) per head dim: t gets a quarter of the pairs or less (slices and
# frames are few), h and w share the rest equally, as Qwen2-VL splits its 3D rotary.
DEFAULT_ROPE_SECTIONS: dict[int, tuple[int, int, int]] = {
    32: (4, 6, 6),
    64: (8, 12, 12),
    72: (4, 16, 16),  # SigLIP so400m (1152 / 16 heads)
    80: (8, 16, 16),
    96: (12, 18, 18),
    128: (16, 24, 24),
}

ATTENTION_SCOPES = ("joint", "frame")
POSITION_ENCODINGS = ("rope", "learned")


def default_rope_sections(head_dim: int) -> tuple[int, int, int]:
    """The documented default split of a head's D/2 rotary pairs over (t, h, w)."""
    if head_dim in DEFAULT_ROPE_SECTIONS:
        return DEFAULT_ROPE_SECTIONS[head_dim]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim, got {head_dim}")
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


class OmniVMedVisionConfig(PretrainedConfig):
    """SigLIP's vision architecture. Field names follow `SiglipVisionConfig`, so a SigLIP
    config converts directly (`from_siglip`).

    `position_encoding`: "rope" (OmniV-Med: rotary (t, h, w) positions in every attention
    layer, no learned embedding) or "learned" (SigLIP's learned absolute embedding of an
    `image_size` x `image_size` input, bicubically interpolated to other grids and added
    to the patch embeddings at each patch's (h, w); no rotary, so t carries nothing).

    `use_post_layernorm`: whether the features pass SigLIP's final LayerNorm (on by
    default, as SigLIP's `last_hidden_state`). Off, the features are the last encoder
    layer's output before it (`hidden_states[-1]`), which is what MedM-VL feeds its
    connector; the tower then has no such LayerNorm and its weights are not loaded.
    """

    model_type = "omnivmed_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        rope_sections: list[int] | None = None,
        attention_scope: str = "joint",
        image_size: int = 224,
        position_encoding: str = "rope",
        use_post_layernorm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.rope_theta = rope_theta
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision hidden_size {hidden_size} is not divisible by num_attention_heads "
                f"{num_attention_heads}"
            )
        head_dim = hidden_size // num_attention_heads
        sections = (
            list(rope_sections)
            if rope_sections is not None
            else list(default_rope_sections(head_dim))
        )
        if len(sections) != 3 or sum(sections) != head_dim // 2:
            raise ValueError(
                f"rope_sections {sections} must be three ints (t, h, w) summing to head_dim/2 = "
                f"{head_dim // 2}"
            )
        self.rope_sections = sections
        if attention_scope not in ATTENTION_SCOPES:
            raise ValueError(
                f"attention_scope must be one of {ATTENTION_SCOPES}, got {attention_scope!r}"
            )
        self.attention_scope = attention_scope
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding must be one of {POSITION_ENCODINGS}, got {position_encoding!r}"
            )
        self.position_encoding = position_encoding
        if image_size < patch_size:
            raise ValueError(f"vision image_size {image_size} is below patch_size {patch_size}")
        self.image_size = image_size
        if not isinstance(use_post_layernorm, bool):
            raise ValueError(
                f"use_post_layernorm must be true or false, got {use_post_layernorm!r}"
            )
        self.use_post_layernorm = use_post_layernorm

    @property
    def rotary(self) -> bool:
        return self.position_encoding == "rope"

    @property
    def position_grid(self) -> int:
        """Side of the learned position embedding's grid, image_size // patch_size (as
        SigLIP's convolution counts patches: a border smaller than a patch is dropped)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_values(self) -> int:
        """Values per patch, P = C * ps * ps, in (channel, row, column) order."""
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_siglip(cls, siglip_config: PretrainedConfig, **overrides: Any) -> OmniVMedVisionConfig:
        """From a `SiglipVisionConfig` or a full `SiglipConfig`."""
        vision = getattr(siglip_config, "vision_config", siglip_config)
        fields = (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_channels", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
            "image_size",
        )  # fmt: skip
        values = {name: getattr(vision, name) for name in fields}
        values.update(overrides)
        return cls(**values)


class OmniVMedEncoder3DConfig(PretrainedConfig):
    """A 3D ViT (M3D-style): 3D patches of `patch_size_3d` = (depth, height, width) voxels
    from a fixed-size volume, learned 3D position embedding, then spatial pooling of the
    output grid to fewer tokens.

    `cls_token`: a learned token prepended before the blocks and dropped after them (M3D's
    ViT has one; it takes part in attention). `final_norm`: whether the output passes the
    final LayerNorm (M3D-LaMed takes it after, MedM-VL before). `pool`: (depth, height,
    width) average-pooling window; (1, 2, 2) by default, (2, 2, 2) is M3D's and MedM-VL's
    spatial pooling (256 tokens from a 32x256x256 volume in 4x16x16 patches).
    """

    model_type = "omnivmed_encoder3d"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 1,
        volume_size: list[int] | None = None,
        patch_size_3d: list[int] | None = None,
        pool: list[int] | None = None,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        cls_token: bool = False,
        final_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.volume_size = list(volume_size or [32, 256, 256])
        self.patch_size_3d = list(patch_size_3d or [4, 16, 16])
        self.pool = list(pool or [1, 2, 2])
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.cls_token = bool(cls_token)
        self.final_norm = bool(final_norm)
        for name in ("volume_size", "patch_size_3d", "pool"):
            value = getattr(self, name)
            if len(value) != 3 or any(int(v) < 1 for v in value):
                raise ValueError(f"encoder3d {name} must be three positive ints, got {value}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"encoder3d hidden_size {hidden_size} is not divisible by num_attention_heads "
                f"{num_attention_heads}"
            )
        grid = self.grid
        if any(v % p for v, p in zip(self.volume_size, self.patch_size_3d, strict=True)):
            raise ValueError(
                f"volume_size {self.volume_size} is not divisible by patch_size_3d {self.patch_size_3d}"
            )
        if any(g % p for g, p in zip(grid, self.pool, strict=True)):
            raise ValueError(f"the 3D patch grid {grid} is not divisible by pool {self.pool}")

    @property
    def grid(self) -> list[int]:
        return [v // p for v, p in zip(self.volume_size, self.patch_size_3d, strict=True)]

    @property
    def num_output_tokens(self) -> int:
        g = self.grid
        return (g[0] // self.pool[0]) * (g[1] // self.pool[1]) * (g[2] // self.pool[2])


class OmniVMedConfig(PretrainedConfig):
    """The whole model: vision encoder, connector, volume strategy and causal LM.

    The parts are named here and looked up in their registries (`omnivmed.models.ENCODERS`,
    `CONNECTORS`, `VOLUME_STRATEGIES`); each part checks the config when it is built, and
    combinations that cannot work are refused then.

    Args:
        vision_config: `OmniVMedVisionConfig` (or a dict of it).
        text_config: the LLM's config (or a dict with its `model_type`); any causal LM.
        vision_encoder: "rotary_siglip" (OmniV-Med) or "siglip" (stock, fixed size).
        connector: "mlp" (2-layer MLP with GELU), "merge_mlp" (2x2 spatial merge, then the
            MLP) or "resampler" (cross-attention to `connector_queries` learned queries).
        volume_strategy: "rotary" (OmniV-Med: slices as frames of one item, pruned),
            "slice_avg" / "slice_attn" (MedM-VL: 2D encoder per slice, then the mean over
            slices / cross-attention compression to `volume_tokens` tokens, with
            `volume_key_positions` coding each key's (slice, row, column)), "encoder3d"
            (a 3D ViT configured by `encoder3d_config`).
        image_token: the placeholder that stands for one visual token in the prompt.
        prune_unit: pruning keeps whole `prune_unit` x `prune_unit` blocks (the model's
            structure needs it for a 2x2 merge); how much is pruned is a media setting
            (`ProcessorOptions.prune_threshold`), saved beside the model, not in it.
    """

    model_type = "omnivmed"
    sub_configs: ClassVar[dict] = {"vision_config": OmniVMedVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | OmniVMedVisionConfig | None = None,
        vision_encoder: str = "rotary_siglip",
        text_config: dict | PretrainedConfig | None = None,
        encoder3d_config: dict | OmniVMedEncoder3DConfig | None = None,
        connector: str = "mlp",
        connector_queries: int = 64,
        volume_strategy: str = "rotary",
        volume_tokens: int = 256,
        volume_key_positions: bool = False,
        image_token: str = "<image>",
        image_token_id: int | None = None,
        prune_unit: int = 1,
        **kwargs: Any,
    ) -> None:
        # Configs saved before the media settings moved to processor_config.json.
        kwargs.pop("prune_threshold", None)
        kwargs.pop("prune_mode", None)
        if isinstance(vision_config, dict):
            vision_config = OmniVMedVisionConfig(**vision_config)
        self.vision_config = vision_config or OmniVMedVisionConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "qwen2")
            text_config = AutoConfig.for_model(model_type, **text_config)
        self.text_config = text_config or AutoConfig.for_model("qwen2")
        if isinstance(encoder3d_config, dict):
            encoder3d_config = OmniVMedEncoder3DConfig(**encoder3d_config)
        self.encoder3d_config = encoder3d_config
        LLMS.check(self.text_config.model_type)
        self.vision_encoder = vision_encoder
        self.connector = connector
        self.connector_queries = connector_queries
        self.volume_strategy = volume_strategy
        self.volume_tokens = volume_tokens
        self.volume_key_positions = volume_key_positions
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.prune_unit = prune_unit
        ModelParts.of(self).check(self)
        kwargs.setdefault(
            "tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False)
        )
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.encoder3d_config is not None and not isinstance(out.get("encoder3d_config"), dict):
            out["encoder3d_config"] = self.encoder3d_config.to_dict()
        return out
