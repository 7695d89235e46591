"""Building a model from component checkpoints or configs, and the named presets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .configuration import OmniVMedConfig, OmniVMedVisionConfig
from .llm_attention import default_llm_attention
from .modeling import OmniVMedForConditionalGeneration
from .registry import ENCODERS, VOLUME_STRATEGIES
from .tokenizer import add_image_token, build_tiny_tokenizer

logger = logging.getLogger(__name__)

_TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8
)
_TINY_LLM = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip

# name -> build_model arguments. Component strings are local directories or hub ids
# already in the local cache (nothing is downloaded at run time).
# MedM-VL: stock SigLIP at 256x256 (learned position embedding, fixed size), Qwen2.5-3B.
_MEDMVL = dict(
    vision="google/siglip-base-patch16-256", vision_encoder="siglip",
    llm="Qwen/Qwen2.5-3B-Instruct", connector="mlp",
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vision=_TINY_VISION, llm=_TINY_LLM, connector="mlp"),
    "tiny-merge": dict(vision=_TINY_VISION, llm=_TINY_LLM, connector="merge_mlp", prune_unit=2),
    "tiny-siglip": dict(
        vision=dict(_TINY_VISION, position_encoding="learned", image_size=32),
        vision_encoder="siglip",
        llm=_TINY_LLM,
        connector="mlp",
    ),
    "omnivmed-1.5b": dict(
        vision="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-1.5B-Instruct", connector="mlp"
    ),
    "omnivmed-7b": dict(
        vision="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-7B-Instruct", connector="mlp"
    ),
    "medmvl-2d": dict(_MEDMVL),
}
# The released architectures with random weights and the built-in tokenizer, for memory
# and throughput planning where the checkpoints are not at hand (nothing is downloaded).
# Shapes from the published configs of SigLIP so400m-patch14-384 and Qwen2.5-1.5B/7B.
_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    patch_size=14,
)  # fmt: skip
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
PRESETS["omnivmed-1.5b-shape"] = dict(
    vision=_SO400M, connector="mlp", llm=dict(
        _QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
)  # fmt: skip
PRESETS["omnivmed-7b-shape"] = dict(
    vision=_SO400M, connector="mlp", llm=dict(
        _QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
)  # fmt: skip
# MedM-VL's CT models: 2D-Avg and 2D-Attn on stock SigLIP; the 3D encoder is M3D-CLIP's
# ViT (32x256x256, 4x16x16 patches) pooled 2x2x2 to 256 tokens, features taken before
# its final norm as MedM-VL does; "rotary" is OmniV-Med's way on MedM-VL's LLM.
PRESETS["medmvl-ct-rotary"] = dict(
    _MEDMVL, vision_encoder="rotary_siglip", volume_strategy="rotary"
)
PRESETS["medmvl-ct-slice_avg"] = dict(_MEDMVL, volume_strategy="slice_avg")
PRESETS["medmvl-ct-slice_attn"] = dict(_MEDMVL, volume_strategy="slice_attn")
PRESETS["medmvl-ct-encoder3d"] = dict(
    _MEDMVL, volume_strategy="encoder3d", volume_encoder="GoodBaiBai88/M3D-CLIP",
    encoder3d_config=dict(pool=[2, 2, 2], final_norm=False),
)  # fmt: skip
for _strategy in ("rotary", "slice_avg", "slice_attn", "encoder3d"):
    PRESETS[f"tiny-ct-{_strategy}"] = dict(
        vision=_TINY_VISION, llm=_TINY_LLM, connector="mlp", volume_strategy=_strategy,
        volume_tokens=16, encoder3d_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            volume_size=[8, 32, 32], patch_size_3d=[4, 8, 8], pool=[1, 2, 2],
        ),
    )  # fmt: skip


def _resolve(component: Any) -> tuple[Path | None, Any]:
    """A directory (or cached hub id) -> (path, None); a config or dict -> (None, it)."""
    if isinstance(component, (str, Path)):
        path = Path(component)
        if path.is_dir():
            return path, None
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(component), local_files_only=True)), None
        except Exception as exc:
            raise FileNotFoundError(
                f"{component!r} is neither a local directory nor a model already in the local "
                f"Hugging Face cache; download it first or pass a directory"
            ) from exc
    return None, component


def build_model(
    vision: Any,
    llm: Any,
    connector: str = "mlp",
    tokenizer: PreTrainedTokenizerBase | None = None,
    vision_encoder: str = "rotary_siglip",
    vision_config: dict[str, Any] | None = None,
    volume_encoder: str | Path | None = None,
    **config_overrides: Any,
) -> tuple[OmniVMedForConditionalGeneration, PreTrainedTokenizerBase]:
    """Assemble a model.

    Args:
        vision: a SigLIP checkpoint directory (its weights load into the vision encoder),
            or an `OmniVMedVisionConfig` / dict (random init).
        llm: a causal-LM checkpoint directory (weights and tokenizer load), or a config /
            dict with `model_type` (random init; then pass `tokenizer`).
        connector: a registered connector name.
        tokenizer: required when `llm` is a config; defaults to the LLM directory's.
        vision_encoder: a registered vision encoder; it reads the checkpoint's config and
            weights its own way ("siglip" keeps the learned position embedding).
        vision_config: vision-config fields set over the checkpoint's or the given config
            (e.g. {"position_encoding": "learned"} for the fixed-position-embedding
            ablation).
        volume_encoder: a checkpoint directory (or cached hub id) for the volume strategy's
            own weights (M3D-CLIP for "encoder3d"); the strategy reads it.
        config_overrides: other `OmniVMedConfig` fields (volume_strategy, prune_*, ...).

    Returns (model, tokenizer); the tokenizer has the image placeholder added and the
    embeddings are resized to it.
    """
    encoder = ENCODERS.get(vision_encoder)
    vision_path, vision_cfg = _resolve(vision)
    llm_path, llm_cfg = _resolve(llm)
    field_overrides = dict(vision_config or {})
    if vision_path is not None:
        vision_cfg = encoder.vision_config_from_pretrained(
            AutoConfig.from_pretrained(vision_path), **field_overrides
        )
    elif isinstance(vision_cfg, dict):
        vision_cfg = OmniVMedVisionConfig(**{**vision_cfg, **field_overrides})
    elif field_overrides:
        vision_cfg = OmniVMedVisionConfig(**{**vision_cfg.to_dict(), **field_overrides})
    volume_path = None
    if volume_encoder is not None:
        if "volume_strategy" not in config_overrides:
            raise ValueError(
                "build_model: volume_encoder is a checkpoint for a volume strategy's own "
                "weights, so name the strategy too (volume_strategy=...)"
            )
        volume_path, _ = _resolve(str(volume_encoder))
        strategy = VOLUME_STRATEGIES.get(config_overrides["volume_strategy"])
        config_overrides.update(strategy.pretrained_config_overrides(volume_path, config_overrides))
    if llm_path is not None:
        llm_cfg = AutoConfig.from_pretrained(llm_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(llm_path)
    if tokenizer is None:
        raise ValueError("build_model: the LLM is a config, so pass a tokenizer")
    config = OmniVMedConfig(
        vision_config=vision_cfg,
        vision_encoder=vision_encoder,
        text_config=llm_cfg,
        connector=connector,
        **config_overrides,
    )
    config.image_token_id = add_image_token(tokenizer, config.image_token)
    model = OmniVMedForConditionalGeneration(config)
    if vision_path is not None:
        model.vision_tower.load_pretrained(vision_path)
    if volume_path is not None:
        model.volume_strategy.load_pretrained(volume_path)
    if llm_path is not None:
        model.language_model = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=model.dtype, attn_implementation=default_llm_attention()
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Grow only: checkpoints often carry spare (padded) rows beyond the tokenizer, and
        # the image token usually fits in them.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    return model, tokenizer


def build_preset(
    name: str, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any
) -> tuple[OmniVMedForConditionalGeneration, PreTrainedTokenizerBase]:
    """Build a named preset (see `PRESETS`); `overrides` replace its arguments (e.g.
    `vision="/data/siglip"`). Presets built from configs (tiny-*, *-shape) get the built-in
    tiny tokenizer; the *-shape presets keep their published vocabulary size."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    args = {**PRESETS[name], **overrides}
    from_configs = isinstance(args.get("llm"), dict)
    if from_configs and tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    args.setdefault("tokenizer", tokenizer)
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    if from_configs and "vocab_size" not in args["llm"]:
        args["llm"] = {**args["llm"], "vocab_size": len(args["tokenizer"]) + 1}
    return build_model(**args)
