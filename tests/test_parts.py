"""Parts that describe themselves: a connector and a volume strategy defined here, in the
test file, run end to end with no edit to the package; combinations the parts' own
declarations forbid are refused when the config is built; checkpoints saved before the
parts existed still load (strictly, every tensor in place)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from omnivmed.models import (
    CONNECTORS,
    VOLUME_STRATEGIES,
    Connector,
    ModelParts,
    OmniVMedConfig,
    OmniVMedForConditionalGeneration,
    VisualKind,
    VolumeItem,
    VolumeStrategy,
    build_model,
    build_tiny_tokenizer,
    trainable_module_names,
    visual_token_count,
)
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from omnivmed.training.config import ConfigError, StageConfig

TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8
)
TINY_LLM = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
LEGACY = Path(__file__).parent / "data" / "legacy"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class PairMeanConnector(Connector, nn.Module):
    """Averages consecutive pairs of each item's features (an odd last one stays alone),
    then projects: ceil(n / 2) tokens per item."""

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    @classmethod
    def output_length(cls, config: OmniVMedConfig, features: int) -> int:
        return (features + 1) // 2

    def forward(self, features, positions, cu_seqlens):
        outs, lengths = [], []
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            item = features[a:b]
            if item.shape[0] % 2:
                item = torch.cat((item, item[-1:]))
            outs.append(item.view(-1, 2, item.shape[-1]).mean(1))
            lengths.append(outs[-1].shape[0])
        cu = torch.zeros(len(lengths) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        cu[1:] = torch.cumsum(torch.tensor(lengths, device=cu.device), 0)
        return self.proj(torch.cat(outs)), cu


class GatedSliceMax(VolumeStrategy, nn.Module):
    """Slices encoded one at a time, then a learned per-channel gate on the max over
    slices: one token per patch position."""

    module_name = "slice_gate"
    encodes_slices_separately = True

    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(config.vision_config.hidden_size))

    @classmethod
    def feature_count(cls, config, frames, grid_h, grid_w, kept):
        return grid_h * grid_w

    def encode(self, item: VolumeItem):
        per_slice = item.grid_h * item.grid_w
        stacked = item.features.view(item.frames, per_slice, -1)
        return stacked.amax(0) * self.gate, item.positions[:per_slice]


@pytest.fixture
def custom_parts():
    CONNECTORS.register("test_pair_mean")(PairMeanConnector)
    VOLUME_STRATEGIES.register("test_gated_max")(GatedSliceMax)
    yield
    CONNECTORS.unregister("test_pair_mean")
    VOLUME_STRATEGIES.unregister("test_gated_max")


def _media(tmp_path: Path) -> list[Media]:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    volume = rng.normal(size=(5, 24, 32)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    return [
        Media(VisualKind.IMAGE, tmp_path / "a.png"),
        Media(VisualKind.VOLUME, tmp_path / "v.npy"),
    ]


def test_parts_defined_outside_the_package_run_end_to_end(custom_parts, tmp_path):
    torch.manual_seed(0)
    model, tok = build_model(
        vision=TINY_VISION, llm=TINY_LLM, connector="test_pair_mean",
        volume_strategy="test_gated_max", tokenizer=build_tiny_tokenizer(),
    )  # fmt: skip
    assert isinstance(model.volume_strategy, GatedSliceMax)
    assert "slice_gate" in trainable_module_names()
    StageConfig(name="s", trainable=["slice_gate", "connector"])  # a stage may train it

    # Token counts and the processor's placeholders come from the parts' own answers.
    processor = OmniVMedProcessor(
        model.config, tok, ProcessorOptions(min_pixels=16 * 16, max_pixels=32 * 32)
    )
    conversation = [
        {"from": "human", "value": "<image> and <image3d>: compare"},
        {"from": "gpt", "value": "alike"},
    ]
    sample = processor(conversation, _media(tmp_path), "s0")
    visual = sample["visual"]
    grids = visual.visual_grids.tolist()
    image_tokens = (grids[0][1] * grids[0][2] + 1) // 2
    volume_tokens = (grids[1][1] * grids[1][2] + 1) // 2  # one per position, then pairs
    assert visual.token_counts == [image_tokens, volume_tokens]
    assert visual.pixel_values.shape[0] == grids[0][1] * grids[0][2] + 5 * grids[1][1] * grids[1][2]
    ids = sample["input_ids"][None]
    assert int((ids == model.config.image_token_id).sum()) == sum(visual.token_counts)

    out = model(input_ids=ids, labels=sample["labels"][None], **visual.model_inputs())
    out.loss.backward()
    assert model.volume_strategy.gate.grad.abs().sum() > 0
    assert model.connector.proj.weight.grad.abs().sum() > 0

    model.eval()
    prompt = ids[:, : int((sample["labels"] == -100).sum())]
    generated = model.generate(input_ids=prompt, **visual.model_inputs(), max_new_tokens=4,
                               do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert generated.shape[1] > prompt.shape[1]

    model.save_pretrained(tmp_path / "saved")
    reloaded = OmniVMedForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert "slice_gate.gate" in reloaded.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, **visual.model_inputs()).logits,
            model(input_ids=ids, **visual.model_inputs()).logits,
        )


def test_token_counts_ask_the_parts(custom_parts):
    config = OmniVMedConfig(
        vision_config=TINY_VISION, text_config=TINY_LLM, connector="test_pair_mean",
        volume_strategy="test_gated_max",
    )  # fmt: skip
    assert visual_token_count(config, VisualKind.IMAGE, 1, 3, 5) == 8
    assert visual_token_count(config, VisualKind.VIDEO, 4, 2, 2, kept=9) == 5
    assert visual_token_count(config, VisualKind.VOLUME, 7, 3, 3) == 5  # 9 positions, paired


def test_unregistered_part_names_list_the_known_ones(custom_parts):
    with pytest.raises(
        ValueError, match=r"unknown volume strategy 'slice'; known .*test_gated_max"
    ):
        OmniVMedConfig(volume_strategy="slice")
    with pytest.raises(ValueError, match=r"unknown connector 'pair'; known .*test_pair_mean"):
        OmniVMedConfig(connector="pair")


@pytest.mark.parametrize("strategy", ["slice_attn", "encoder3d"])
def test_merge_after_a_compressing_strategy_is_refused_at_config_time(strategy):
    with pytest.raises(ValueError, match=rf"'merge_mlp' needs whole patch grids.*'{strategy}'"):
        OmniVMedConfig(
            vision_config=TINY_VISION, connector="merge_mlp", prune_unit=2,
            volume_strategy=strategy,
        )  # fmt: skip


def test_parts_answer_for_pruning_and_grid_blocks():
    rotary = ModelParts.of(OmniVMedConfig(vision_config=TINY_VISION))
    assert rotary.may_prune(VisualKind.VOLUME) and rotary.may_prune(VisualKind.VIDEO)
    slices = ModelParts.of(OmniVMedConfig(vision_config=TINY_VISION, volume_strategy="slice_avg"))
    assert not slices.may_prune(VisualKind.VOLUME) and slices.may_prune(VisualKind.VIDEO)
    merged = OmniVMedConfig(vision_config=TINY_VISION, connector="merge_mlp", prune_unit=4)
    assert ModelParts.of(merged).grid_multiple(merged) == 4


def test_encoder3d_hidden_size_must_match_the_vision_tower():
    with pytest.raises(
        ValueError, match=r"hidden_size 32 must equal the vision encoder's hidden_size 64"
    ):
        OmniVMedConfig(
            vision_config=TINY_VISION, volume_strategy="encoder3d",
            encoder3d_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1),
        )  # fmt: skip


@pytest.mark.parametrize("preset", sorted(p.name for p in LEGACY.iterdir()))
def test_checkpoints_saved_before_the_parts_still_load(preset, tmp_path):
    """A checkpoint in the layout the package saved before parts described themselves
    (its config.json as saved, its state-dict names and shapes recorded in weights.json:
    `slice_compressor.*`, `encoder3d.*`, `connector.*`) loads strictly, every tensor
    where it was, and the model runs."""
    import shutil

    from omnivmed.models.loading import load_saved_model
    from omnivmed.processing import VisualItem, pack_visual_items

    shutil.copy(LEGACY / preset / "config.json", tmp_path / "config.json")
    layout = json.loads((LEGACY / preset / "weights.json").read_text())["tensors"]
    generator = torch.Generator().manual_seed(0)
    written = {
        name: (torch.randn(spec["shape"], generator=generator) * 0.02).to(
            SAFETENSORS_DTYPES[spec["dtype"]]
        )
        for name, spec in layout.items()
    }
    save_file(written, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_saved_model(tmp_path).eval()  # strict: no missing, unknown or misshapen weights
    state = model.state_dict()
    for name, value in written.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    items = [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 16)),
             VisualItem(VisualKind.VOLUME, torch.randn(4, 3, 16, 16), volume3d=torch.randn(1, 8, 32, 32))]  # fmt: skip
    batch = pack_visual_items(items, model.config)
    ids = torch.full((1, sum(batch.token_counts) + 3), model.config.image_token_id)
    ids[0, -3:] = 5
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, **batch.model_inputs()).logits).all()


def test_stage_model_settings_change_the_preset_and_are_checked():
    from omnivmed.training.trainer import load_initial_model

    cfg = StageConfig(name="pe", model={"vision_config": {"position_encoding": "learned"}})
    model, _ = load_initial_model(cfg)
    assert not model.config.vision_config.rotary
    assert hasattr(model.vision_tower, "position_embedding")
    with pytest.raises(ConfigError, match="unknown model settings"):
        StageConfig(name="bad", model={"vision_cfg": {}})
    with pytest.raises(ConfigError, match="a saved model keeps the architecture"):
        StageConfig(name="late", init="previous", model={"connector": "resampler"})


def test_models_package_has_no_import_cycle():
    """The module-level imports inside `omnivmed.models` form a DAG (the package's
    `__init__` only gathers; imports inside functions run later and cannot cycle)."""
    import ast

    import omnivmed.models as models_pkg

    root = Path(models_pkg.__file__).parent
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts): p
        for p in root.rglob("*.py")
        if p.name != "__init__.py"
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[:-1]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                for alias in node.names:
                    for candidate in (f"{target}.{alias.name}", target):
                        if candidate in modules:
                            deps.add(candidate)
                            break
        graph[name] = deps - {name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])
    assert "parts" in graph["connectors.mlp"] and not graph["registry"]
