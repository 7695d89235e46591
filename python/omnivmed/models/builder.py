"""Building a model from component checkpoints or configs, and the named presets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .configuration import OmniVMedConfig, OmniVMedVisionConfig
from .modeling import OmniVMedForConditionalGeneration
from .tokenizer import add_image_token, build_tiny_tokenizer
from .vision import load_siglip_weights

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
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vision=_TINY_VISION, llm=_TINY_LLM, connector="mlp"),
    "tiny-merge": dict(vision=_TINY_VISION, llm=_TINY_LLM, connector="merge_mlp", prune_unit=2),
    "omnivmed-1.5b": dict(
        vision="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-1.5B-Instruct", connector="mlp"
    ),
    "omnivmed-7b": dict(
        vision="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-7B-Instruct", connector="mlp"
    ),
    "medmvl-2d": dict(
        vision="google/siglip-base-patch16-256", llm="Qwen/Qwen2.5-3B-Instruct", connector="mlp"
    ),
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
for _strategy in ("rotary", "slice_avg", "slice_attn", "encoder3d"):
    PRESETS[f"medmvl-ct-{_strategy}"] = dict(
        vision="google/siglip-base-patch16-256", llm="Qwen/Qwen2.5-3B-Instruct",
        connector="mlp", volume_strategy=_strategy, prune_threshold=0.0 if _strategy != "rotary" else 0.1,
    )  # fmt: skip
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
    **config_overrides: Any,
) -> tuple[OmniVMedForConditionalGeneration, PreTrainedTokenizerBase]:
    """Assemble a model.

    Args:
        vision: a SigLIP checkpoint directory (its weights load, all but the position
            embedding), or an `OmniVMedVisionConfig` / dict (random init).
        llm: a causal-LM checkpoint directory (weights and tokenizer load), or a config /
            dict with `model_type` (random init; then pass `tokenizer`).
        connector: a registered connector name.
        tokenizer: required when `llm` is a config; defaults to the LLM directory's.
        config_overrides: other `OmniVMedConfig` fields (volume_strategy, prune_*, ...).

    Returns (model, tokenizer); the tokenizer has the image placeholder added and the
    embeddings are resized to it.
    """
    vision_path, vision_cfg = _resolve(vision)
    llm_path, llm_cfg = _resolve(llm)
    if vision_path is not None:
        vision_cfg = OmniVMedVisionConfig.from_siglip(AutoConfig.from_pretrained(vision_path))
    if llm_path is not None:
        llm_cfg = AutoConfig.from_pretrained(llm_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(llm_path)
    if tokenizer is None:
        raise ValueError("build_model: the LLM is a config, so pass a tokenizer")
    config = OmniVMedConfig(
        vision_config=vision_cfg, text_config=llm_cfg, connector=connector, **config_overrides
    )
    config.image_token_id = add_image_token(tokenizer, config.image_token)
    model = OmniVMedForConditionalGeneration(config)
    if vision_path is not None:
        load_siglip_weights(model.vision_tower, vision_path)
    if llm_path is not None:
        model.language_model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=model.dtype)
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
