"""MedM-VL's released models (MedM-VL-2D-3B-en, MedM-VL-CT-Chest-3B-en, released
2025-04-10) as omnivmed models.

A release folder holds `config.json` in MedM-VL's format of that date (flat `llm_*`,
`encoder_image_*`, `connector_image_*` keys plus nested `llm_config`,
`encoder_image_config`, `connector_image_config`), `generation_config.json` and safetensors
weights (sharded, with `model.safetensors.index.json`, or one `model.safetensors`). The
config names the LLM and the vision encoder by hub-looking ids (`Qwen/Qwen2.5-3B-Instruct`,
`google/siglip-base-patch16-256-multilingual`) that MedM-VL opens as folders: they give
the tokenizer, the image-processor settings and the LLM's generation defaults. They are
looked for inside the release folder and beside it, or given with --llm / --encoder.

The mapping (docs/import_medm_vl.md has the table):

- LLM `llm.*` -> `language_model.*` (Qwen2; the output head tied to the embedding).
- SigLIP `encoder_image.encoder.vision_model.*` -> the `siglip` vision encoder with
  `use_post_layernorm=False`: MedM-VL's `cls_patch` features of layer -1 are the last
  encoder layer's output before SigLIP's final LayerNorm, so `post_layernorm.*` and the
  pooling `head.*` are unused.
- `mlp` connector `connector_image.connector.{0,2}` -> the `mlp` connector (Linear, exact
  GELU, Linear); `attn_pooling` connector (`query`, `attn`, `connector.{0,2}`) ->
  `attn_pool_mlp`.
- A CT volume: every slice through SigLIP on its own (`slice_concat`), all slices' tokens
  to the connector, as MedM-VL does.
- Media: Pillow bicubic resize of 8-bit RGB to the encoder's size, then (x / 255 - mean) /
  std with the encoder folder's mean and std (`resize="pil_bicubic"`); `.npy` CT volumes of
  grey levels in [0, 255] cut to whole levels (`intensity="uint8"`); no pruning.
- The prompt: MedM-VL's `qwen2` conversation written as the tokenizer's chat template.
- Generation: the LLM folder's repetition penalty, over the answer's tokens only; the
  answer ends at `<|im_end|>`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import IMPORTERS, Importer, ReleaseError, write_folder

RELEASE_ARCHITECTURE = "LVLMForConditionalGeneration"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
# MedM-VL's `qwen2` conversation: "<system> USER: <question> ASSISTANT:<answer><|im_end|>"
# for each exchange; the prompt of a new answer ends with "ASSISTANT:". MedM-VL writes a
# space after "ASSISTANT:" that its tokenizer joins to the answer's first word; here an
# answer's text follows the colon directly, so a history or training answer that starts
# with its space (" Yes, ...") gives MedM-VL's exact tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + ' ' }}"
    "{%- else -%}{{ '" + SYSTEM_PROMPT.replace("'", "\\'") + " ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' + message['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
# The release's connector types -> omnivmed connectors.
CONNECTORS = {"mlp": "mlp", "attn_pooling": "attn_pool_mlp"}
VISION_PREFIX = "encoder_image.encoder.vision_model."
UNUSED = {
    VISION_PREFIX + "post_layernorm.": "MedM-VL takes SigLIP's features before its final LayerNorm",
    VISION_PREFIX + "head.": "SigLIP's attention-pooling head; MedM-VL uses the patch features",
}
# Architecture fields that the nested configs and the component folders must agree on.
_LLM_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")  # fmt: skip
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "patch_size", "image_size")  # fmt: skip


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ReleaseError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReleaseError(f"{path}: expected a JSON object ({what})")
    return data


def _inside(path: Path, folder: Path) -> Path:
    """`path` resolved; a link that leads out of `folder` is refused (a release is read
    from its own folder only)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ReleaseError(f"{path}: a link to {resolved}, outside the release folder {folder}")
    return resolved


class _Release:
    """A release folder's config, checked field by field."""

    def __init__(self, source: Path) -> None:
        if not source.is_dir():
            raise ReleaseError(f"{source}: not a folder")
        self.source = source
        self.config_path = source / "config.json"
        _inside(self.config_path, source)
        self.config = _read_json(self.config_path, "the release's config")
        architectures = self.config.get("architectures") or []
        if RELEASE_ARCHITECTURE not in architectures:
            raise ReleaseError(
                f"{self.config_path}: architectures = {architectures!r}, not a MedM-VL release "
                f"({RELEASE_ARCHITECTURE})"
            )
        if "llm_config" not in self.config:
            renamed = sorted(k for k in self.config if k.startswith("lvlm_"))
            hint = (
                f" (it has {', '.join(renamed[:3])}: MedM-VL's later key names)" if renamed else ""
            )
            raise ReleaseError(
                f"{self.config_path}: no llm_config{hint}; only the release format of "
                "2025-04-10 (nested llm_config / encoder_image_config) is read"
            )

    def field(self, name: str, allowed: tuple | None = None) -> Any:
        value = self.config.get(name)
        if allowed is not None and value not in allowed:
            raise ReleaseError(
                f"{self.config_path}: {name} = {value!r} is not supported (supported: "
                f"{', '.join(repr(a) for a in allowed)})"
            )
        return value

    def nested(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        if not isinstance(value, dict):
            raise ReleaseError(f"{self.config_path}: {name} must be an object, got {value!r}")
        return value


def _component(release: _Release, key: str, given: str | None, option: str) -> Path:
    """The component folder `key` names: `given`, else inside the release, else beside it."""
    if given is not None:
        folder = Path(given)
        if not (folder / "config.json").is_file():
            raise ReleaseError(f"{option} {folder}: no config.json there")
        return folder
    name = release.field(key)
    if (
        not isinstance(name, str)
        or not name
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        raise ReleaseError(f"{release.config_path}: {key} = {name!r} is not a folder name")
    tried = [release.source / name, release.source.parent / name]
    for folder in tried:
        if (folder / "config.json").is_file():
            return folder
    raise ReleaseError(
        f"{release.config_path}: {key} = {name!r} names a folder found neither at "
        f"{tried[0]} nor at {tried[1]}; download it there or pass {option} DIR"
    )


def _agree(nested: dict[str, Any], actual: Any, fields: tuple[str, ...], where: str,
           folder: Path) -> None:  # fmt: skip
    for name in fields:
        if name in nested and getattr(actual, name, None) != nested[name]:
            raise ReleaseError(
                f"{folder}/config.json: {name} = {getattr(actual, name, None)!r}, but the "
                f"release's {where}.{name} = {nested[name]!r}; is this the folder it was trained from?"
            )


def _image_settings(encoder_dir: Path, image_size: int) -> dict[str, Any]:
    """Mean and std from the encoder folder's preprocessor_config.json, after checking that
    it describes what `resize="pil_bicubic"` does."""
    path = encoder_dir / "preprocessor_config.json"
    pre = _read_json(path, "the vision encoder's image-processor settings")
    size = pre.get("size")
    side = (size.get("height"), size.get("width")) if isinstance(size, dict) else None
    checks = (
        ("resample", pre.get("resample"), 3, "3 (bicubic)"),
        ("size", side, (image_size, image_size), f"{{height: {image_size}, width: {image_size}}}"),
        ("do_resize", pre.get("do_resize", True), True, "true"),
        ("do_rescale", pre.get("do_rescale", True), True, "true"),
        ("do_normalize", pre.get("do_normalize", True), True, "true"),
    )
    for name, value, wanted, shown in checks:
        if value != wanted:
            raise ReleaseError(f"{path}: {name} = {value!r}, only {shown} is supported")
    factor = pre.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise ReleaseError(f"{path}: rescale_factor = {factor!r}, only 1/255 is supported")
    settings = {}
    for name in ("image_mean", "image_std"):
        value = pre.get(name)
        if not (isinstance(value, list) and len(value) == 3):
            raise ReleaseError(f"{path}: {name} = {value!r}, expected three numbers")
        settings[name] = tuple(float(v) for v in value)
    return settings


def _weight_files(source: Path) -> dict[str, list[str]]:
    """{shard file name: the tensor names the index puts there}, shards in index order;
    every shard must exist inside the folder."""
    index_path = source / "model.safetensors.index.json"
    if index_path.exists():
        _inside(index_path, source)
        index = _read_json(index_path, "the weights' index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ReleaseError(f"{index_path}: weight_map must be a non-empty object")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise ReleaseError(
                    f"{index_path}: {name} is in {file!r}, not a file of this folder"
                )
            files.setdefault(file, []).append(name)
    elif (source / "model.safetensors").exists():
        files = {"model.safetensors": []}
    else:
        raise ReleaseError(
            f"{source}: no weights (neither model.safetensors.index.json nor model.safetensors)"
        )
    for file in files:
        path = source / file
        if not path.exists():
            raise ReleaseError(f"{path}: missing (the weights' index lists it)")
        if not _inside(path, source).is_file():
            raise ReleaseError(f"{path}: not a regular file")
    return files


def _read_shard(path: Path, listed: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, checked against the index and for NaN/Inf."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises its own errors for a cut or bad file
        raise ReleaseError(f"{path}: not a readable safetensors file ({exc})") from exc
    if listed:
        absent = sorted(set(listed) - set(names))
        if absent:
            raise ReleaseError(f"{path}: lacks {absent[0]}, which the weights' index puts there")
        extra = sorted(set(names) - set(listed))
        if extra:
            raise ReleaseError(f"{path}: holds {extra[0]}, which the weights' index does not list")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ReleaseError(f"{path}: {name} holds NaN or infinite values")
    return tensors


def _target(name: str) -> str | None:
    """The omnivmed name of a release tensor; None for a deliberately unused one; raises
    for a name that is no weight of a supported MedM-VL model."""
    if any(name.startswith(prefix) for prefix in UNUSED):
        return None
    if name.startswith("llm."):
        return "language_model." + name[len("llm.") :]
    if name.startswith(VISION_PREFIX):
        rest = name[len(VISION_PREFIX) :]
        if rest.startswith("embeddings.patch_embedding."):
            return "vision_tower." + rest[len("embeddings.") :]
        if rest == "embeddings.position_embedding.weight":
            return "vision_tower.position_embedding.weight"
        if rest.startswith("encoder.layers."):
            return "vision_tower." + rest[len("encoder.") :]
    for ours, theirs in (("linear_1", "connector.0"), ("linear_2", "connector.2")):
        prefix = f"connector_image.{theirs}."
        if name.startswith(prefix):
            return f"connector.{ours}." + name[len(prefix) :]
    if name == "connector_image.query" or name.startswith("connector_image.attn."):
        return "connector." + name[len("connector_image.") :]
    raise ReleaseError(f"unknown tensor {name}")


def _expected_weights(config) -> tuple[dict[str, torch.Size], set[str]]:
    """The model's saved weights and their shapes (built on the meta device: no memory),
    and the names tied to another weight (not saved)."""
    from ..models.modeling import OmniVMedForConditionalGeneration

    with torch.device("meta"):
        model = OmniVMedForConditionalGeneration(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        embedding = model.get_input_embeddings().weight
        for name, param in model.named_parameters(remove_duplicate=False):
            if param is embedding and name != "language_model.model.embed_tokens.weight":
                tied.add(name)
    return shapes, tied


@IMPORTERS.register("medm-vl")
class MedMVLImporter(Importer):
    summary = "MedM-VL-2D-3B-en, MedM-VL-CT-Chest-3B-en (release format of 2025-04-10)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--llm", metavar="DIR", help="the LLM folder the release's llm_name_or_path names "
            "(default: looked for inside the release folder, then beside it)",
        )  # fmt: skip
        parser.add_argument(
            "--encoder", metavar="DIR", help="the vision encoder folder the release's "
            "encoder_image_name_or_path names (default: as for --llm)",
        )  # fmt: skip

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"llm": args.llm, "encoder": args.encoder}

    @classmethod
    def import_release(
        cls, source: Path, out: Path, llm: str | None = None, encoder: str | None = None
    ) -> dict[str, Any]:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig, SiglipVisionConfig

        from ..models.configuration import OmniVMedConfig
        from ..models.registry import ENCODERS
        from ..models.tokenizer import add_image_token
        from ..processing.options import ProcessorOptions
        from ..processing.processor import OmniVMedProcessor

        source = Path(source)
        release = _Release(source)
        release.field("llm_type", ("qwen2",))
        release.field("encoder_image_type", ("siglip",))
        # SigLIP has no class token: "cls_patch" and "patch" are the same patch features.
        release.field("encoder_image_select_feature", ("cls_patch", "patch"))
        release.field("encoder_image_select_layer", (-1,))
        connector_type = release.field("connector_image_type", tuple(CONNECTORS))
        release.field("connector_image_name", ("mlp2x_gelu",))
        for name in ("encoder_image3d_type", "connector_image3d_type"):
            release.field(name, (None,))
        llm_dir = _component(release, "llm_name_or_path", llm, "--llm")
        encoder_dir = _component(release, "encoder_image_name_or_path", encoder, "--encoder")

        try:
            llm_config = AutoConfig.from_pretrained(llm_dir)
            # The vision half only: a full SigLIP config's text half is not used.
            siglip_config = SiglipVisionConfig.from_pretrained(encoder_dir)
        except Exception as exc:
            raise ReleaseError(f"a component config cannot be read ({exc})") from exc
        _agree(release.nested("llm_config"), llm_config, _LLM_FIELDS, "llm_config", llm_dir)
        vision_hf = siglip_config
        _agree(release.nested("encoder_image_config"), vision_hf, _VISION_FIELDS,
               "encoder_image_config", encoder_dir)  # fmt: skip
        connector_nested = release.nested("connector_image_config")
        for name, wanted in (
            ("input_dim", vision_hf.hidden_size),
            ("output_dim", llm_config.hidden_size),
        ):
            if connector_nested.get(name, wanted) != wanted:
                raise ReleaseError(
                    f"{release.config_path}: connector_image_config.{name} = "
                    f"{connector_nested[name]!r}, but the components give {wanted}"
                )
        siglip = ENCODERS.get("siglip")
        vision_config = siglip.vision_config_from_pretrained(
            siglip_config, use_post_layernorm=False
        )
        media = _image_settings(encoder_dir, vision_config.image_size)

        files = _weight_files(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        except Exception as exc:
            raise ReleaseError(f"{llm_dir}: the tokenizer cannot be loaded ({exc})") from exc
        tokenizer.chat_template = CHAT_TEMPLATE

        # The connector's query count is fixed in MedM-VL's code: read it off the weights.
        shards = {file: _read_shard(source / file, listed) for file, listed in files.items()}
        queries = next((t.shape[0] for s in shards.values() for n, t in s.items()
                        if n == "connector_image.query"), None)  # fmt: skip
        if connector_type == "attn_pooling" and queries is None:
            raise ReleaseError(
                f"{source}: the attn_pooling connector's connector_image.query is missing"
            )
        config = OmniVMedConfig(
            vision_config=vision_config,
            vision_encoder="siglip",
            text_config=llm_config,
            connector=CONNECTORS[connector_type],
            connector_queries=queries or 64,
            volume_strategy="slice_concat",
        )
        config.image_token_id = add_image_token(tokenizer, config.image_token)
        if config.image_token_id >= llm_config.vocab_size:
            raise ReleaseError(
                f"{llm_dir}: the tokenizer's {len(tokenizer)} tokens leave no spare embedding "
                f"row (vocab_size {llm_config.vocab_size}) for the image placeholder"
            )
        config.architectures = ["OmniVMedForConditionalGeneration"]
        expected, tied = _expected_weights(config)

        mapped: list[dict[str, torch.Tensor]] = []
        seen: dict[str, str] = {}
        unused: dict[str, str] = {}
        for file, tensors in shards.items():
            out_shard = {}
            for name, tensor in tensors.items():
                try:
                    target = _target(name)
                except ReleaseError as exc:
                    raise ReleaseError(f"{source / file}: {exc}") from None
                if target is None:
                    unused[name] = next(why for p, why in UNUSED.items() if name.startswith(p))
                    continue
                if target.endswith("patch_embedding.weight") and tensor.dim() == 4:
                    tensor = tensor.reshape(tensor.shape[0], -1)  # conv -> linear map
                if target not in expected or target in tied:
                    raise ReleaseError(
                        f"{source / file}: {name} has no place in the model ({target})"
                    )
                if expected[target] != tensor.shape:
                    raise ReleaseError(
                        f"{source / file}: {name} has shape {tuple(tensor.shape)}, the model's "
                        f"{target} is {tuple(expected[target])}"
                    )
                if target in seen:
                    raise ReleaseError(f"{source / file}: {name} is also in {seen[target]}")
                seen[target] = file
                out_shard[target] = tensor.contiguous()
            if out_shard:
                mapped.append(out_shard)
        missing = sorted(set(expected) - set(seen) - tied)
        if missing:
            raise ReleaseError(
                f"{source}: the release lacks {len(missing)} weights the model needs, e.g. "
                f"{', '.join(missing[:3])}"
            )

        generation = {}
        llm_generation = llm_dir / "generation_config.json"
        if llm_generation.is_file():
            generation = _read_json(llm_generation, "the LLM's generation defaults")
        penalty = generation.get("repetition_penalty", 1.0)

        def build(folder: Path) -> dict[str, Any]:
            from safetensors.torch import save_file

            config.save_pretrained(folder)
            weight_map, total = {}, 0
            for k, shard in enumerate(mapped, start=1):
                file = f"model-{k:05d}-of-{len(mapped):05d}.safetensors"
                save_file(shard, str(folder / file), metadata={"format": "pt"})
                for name, tensor in shard.items():
                    weight_map[name] = file
                    total += tensor.numel() * tensor.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            GenerationConfig(
                bos_token_id=generation.get("bos_token_id"),
                eos_token_id=tokenizer.eos_token_id,  # MedM-VL stops on the end of turn only
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=penalty,
            ).save_pretrained(folder)
            options = ProcessorOptions(
                resize="pil_bicubic", intensity="uint8", prune=False, **media
            )
            OmniVMedProcessor(config, tokenizer, options).save_pretrained(folder)
            summary = {
                "family": cls.registered_name,
                "source": str(source.resolve()),
                "llm": str(llm_dir.resolve()),
                "encoder": str(encoder_dir.resolve()),
                "connector": config.connector,
                "weights": len(seen),
                "unused": unused,
            }
            (folder / "import.json").write_text(json.dumps(summary, indent=2) + "\n")
            return summary

        return write_folder(out, build)
