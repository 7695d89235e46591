"""The model: config, rotary vision tower (vs SigLIP), connectors, registry, LLM glue
with several LLM families, save/load, generation and MedM-VL's 3D strategies."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
)

import omnivmed
from omnivmed.models import (
    CONNECTORS,
    OmniVMedConfig,
    OmniVMedForConditionalGeneration,
    OmniVMedVisionConfig,
    RotaryVisionTower,
    VisualKind,
    build_model,
    build_preset,
    build_tiny_tokenizer,
    default_rope_sections,
    load_siglip_weights,
)
from omnivmed.models.connectors import MergeMLPConnector
from omnivmed.processing import VisualItem, pack_visual_items, patchify
from omnivmed_ext import frame_positions

TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8
)
LLMS = {
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4),
}  # fmt: skip


def chat(tokenizer, placeholders: int, question: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": "<image>" * placeholders + question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=answer is None
    )


def scramble(model, std=0.3):
    """Random weights large enough that greedy decoding does not repeat one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


def test_default_rope_sections_documented_head_dims():
    assert default_rope_sections(64) == (8, 12, 12)
    assert default_rope_sections(72) == (4, 16, 16)
    assert default_rope_sections(80) == (8, 16, 16)
    assert sum(default_rope_sections(40)) == 20


def test_vision_config_rejects_bad_sections_and_scope():
    with pytest.raises(ValueError, match="summing to head_dim/2"):
        OmniVMedVisionConfig(**TINY_VISION, rope_sections=[1, 2, 3])
    with pytest.raises(ValueError, match="attention_scope"):
        OmniVMedVisionConfig(**TINY_VISION, attention_scope="global")


def test_registries_reject_unknown_encoders_and_llms():
    with pytest.raises(
        ValueError,
        match="unknown vision encoder 'clip'; known vision encoders: rotary_siglip, siglip",
    ):
        OmniVMedConfig(vision_encoder="clip")
    assert {"qwen2", "llama", "phi"} <= set(omnivmed.models.LLMS.names())
    with pytest.raises(ValueError, match="unknown LLM family"):
        OmniVMedConfig(text_config=ViTConfig())


def test_registry_names_known_connectors_exactly():
    assert CONNECTORS.names() == ["attn_pool_mlp", "merge_mlp", "mlp", "resampler"]
    with pytest.raises(
        ValueError,
        match="unknown connector 'ml'; known connectors: attn_pool_mlp, merge_mlp, mlp, resampler",
    ):
        OmniVMedConfig(connector="ml")  # no substring matching


def test_tower_matches_siglip_when_rotation_is_identity():
    # With every position (0, 0, 0) the rotary embedding is the identity; SigLIP with a
    # zeroed position embedding is then the same function, weight for weight.
    siglip_cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    siglip = SiglipVisionModel(siglip_cfg).eval()
    embeddings = getattr(siglip, "vision_model", siglip).embeddings
    with torch.no_grad():
        embeddings.position_embedding.weight.zero_()
    tower = RotaryVisionTower(OmniVMedVisionConfig.from_siglip(siglip_cfg)).eval()
    tower.load_state_dict({**tower.state_dict(), **_siglip_state(siglip)})
    image = torch.randn(1, 3, 32, 32)
    expected = siglip(pixel_values=image).last_hidden_state[0]
    patches = patchify(image, 8)[0]
    got = tower(
        patches, torch.zeros(16, 3, dtype=torch.int32), torch.tensor([0, 16], dtype=torch.int32)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _siglip_state(siglip):
    state = {}
    for key, value in siglip.state_dict().items():
        name = key.removeprefix("vision_model.")
        if name.startswith("embeddings.patch_embedding"):
            state[name.replace("embeddings.", "")] = (
                value.reshape(value.shape[0], -1) if value.dim() == 4 else value
            )
        elif name.startswith("encoder.layers."):
            state[name.replace("encoder.", "")] = value
        elif name.startswith("post_layernorm"):
            state[name] = value
    return state


@pytest.mark.parametrize("full_model", [False, True])
def test_load_siglip_checkpoint_directory(tmp_path, full_model):
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    if full_model:
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
        )
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict())).save_pretrained(
            tmp_path
        )
    else:
        SiglipVisionModel(vision).save_pretrained(tmp_path)
    model, _ = build_model(
        vision=str(tmp_path), llm=LLMS["qwen2"], tokenizer=build_tiny_tokenizer()
    )
    report = load_siglip_weights(RotaryVisionTower(model.config.vision_config), tmp_path)
    assert report["missing"] == []
    assert any("position_embedding" in k for k in report["skipped"])
    assert len(report["loaded"]) == len(RotaryVisionTower(model.config.vision_config).state_dict())
    if full_model:
        assert any(k.startswith("text_model.") for k in report["skipped"])


def test_missing_siglip_directory():
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        build_model(
            vision="/nonexistent/siglip", llm=LLMS["qwen2"], tokenizer=build_tiny_tokenizer()
        )


def test_packing_isolates_items_and_frame_scope_isolates_slices():
    tower = RotaryVisionTower(OmniVMedVisionConfig(**TINY_VISION)).eval()
    a, b = torch.randn(12, 192), torch.randn(20, 192)
    pa, pb = frame_positions(1, 3, 4), frame_positions(1, 4, 5)
    alone_a = tower(a, pa, torch.tensor([0, 12], dtype=torch.int32))
    packed = tower(
        torch.cat((a, b)), torch.cat((pa, pb)), torch.tensor([0, 12, 32], dtype=torch.int32)
    )
    torch.testing.assert_close(packed[:12], alone_a, rtol=1e-5, atol=1e-5)
    # A 3-slice volume: joint attention mixes slices; frame scope equals slices alone.
    volume = torch.randn(3 * 6, 192)
    pos = frame_positions(3, 2, 3)
    cu = torch.tensor([0, 18], dtype=torch.int32)
    framewise = RotaryVisionTower(
        OmniVMedVisionConfig(**TINY_VISION, attention_scope="frame")
    ).eval()
    framewise.load_state_dict(tower.state_dict())
    per_slice = torch.cat(
        [
            tower(
                volume[6 * s : 6 * s + 6],
                pos[6 * s : 6 * s + 6],
                torch.tensor([0, 6], dtype=torch.int32),
            )
            for s in range(3)
        ]
    )
    torch.testing.assert_close(framewise(volume, pos, cu), per_slice, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tower(volume, pos, cu), per_slice, atol=1e-3)


def test_gradient_checkpointing_gives_same_gradients():
    tower = RotaryVisionTower(OmniVMedVisionConfig(**TINY_VISION)).train()
    x, pos = torch.randn(12, 192), frame_positions(1, 3, 4)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    tower(x, pos, cu).square().sum().backward()
    plain = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    tower.gradient_checkpointing = True
    tower(x, pos, cu).square().sum().backward()
    for g, p in zip(plain, tower.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_merge_connector_groups_2x2_blocks_by_position():
    config = OmniVMedConfig(
        vision_config=dict(TINY_VISION, hidden_size=4, num_attention_heads=1),
        text_config=dict(LLMS["qwen2"], hidden_size=8, num_attention_heads=2, num_key_value_heads=1),
        connector="merge_mlp", prune_unit=2,
    )  # fmt: skip
    conn = MergeMLPConnector(config)
    features = torch.arange(16 * 4, dtype=torch.float32).view(16, 4)
    pos = frame_positions(1, 4, 4)
    order = torch.randperm(16)  # any token order: blocks are found from positions
    out, cu = conn(features[order], pos[order], torch.tensor([0, 16], dtype=torch.int32))
    assert out.shape == (4, 8) and cu.tolist() == [0, 4]
    ref, _ = conn(features, pos, torch.tensor([0, 16], dtype=torch.int32))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="every 2x2 block"):
        conn(features[:15], pos[:15], torch.tensor([0, 15], dtype=torch.int32))


@pytest.mark.parametrize("llm", sorted(LLMS))
@pytest.mark.parametrize("connector", ["mlp", "merge_mlp", "resampler"])
def test_forward_loss_and_backward(llm, connector):
    model, tok = build_model(vision=TINY_VISION, llm=LLMS[llm], connector=connector,
                             tokenizer=build_tiny_tokenizer(), connector_queries=5, prune_unit=2)  # fmt: skip
    items = [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 32, 32)),
             VisualItem(VisualKind.VIDEO, torch.randn(4, 3, 16, 16))]  # fmt: skip
    batch = pack_visual_items(items, model.config)
    text = chat(tok, sum(batch.token_counts), " what is shown?", "a scan")
    ids = tok(text, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = -100  # loss on the answer only
    out = model(input_ids=ids, labels=labels, **batch.model_inputs())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vision_tower.patch_embedding.weight.grad.abs().sum() > 0
    assert model.connector.state_dict() and all(
        p.grad is not None for p in model.connector.parameters()
    )


def test_placeholder_count_mismatch_names_both_counts():
    model, tok = build_preset("tiny")
    batch = pack_visual_items(
        [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 16))], model.config
    )
    ids = tok(chat(tok, batch.token_counts[0] + 1, " hi"), return_tensors="pt").input_ids
    with pytest.raises(
        ValueError, match=r"has 5 image placeholder tokens but the visual inputs give 4"
    ):
        model(input_ids=ids, **batch.model_inputs())
    with pytest.raises(ValueError, match="no visual inputs were given"):
        model(input_ids=ids)


def test_save_and_reload_from_directory_alone(tmp_path):
    model, tok = build_preset("tiny")
    model.eval()
    batch = pack_visual_items(
        [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 24))], model.config
    )
    ids = tok(chat(tok, batch.token_counts[0], " describe"), return_tensors="pt").input_ids
    before = model(input_ids=ids, **batch.model_inputs()).logits
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for cls in (OmniVMedForConditionalGeneration, AutoModelForCausalLM):
        reloaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, OmniVMedForConditionalGeneration)
        torch.testing.assert_close(reloaded(input_ids=ids, **batch.model_inputs()).logits, before)


def test_batched_generation_with_left_padding_matches_one_at_a_time():
    torch.manual_seed(0)
    model, tok = build_preset("tiny")
    scramble(model).eval()
    tok.padding_side = "left"
    items = [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 32, 40)),
             VisualItem(VisualKind.VOLUME, torch.randn(3, 3, 16, 16))]  # fmt: skip
    questions = [" what is this image?", " describe"]
    single = []
    gen = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    for item, q in zip(items, questions, strict=True):
        b = pack_visual_items([item], model.config)
        single.append(
            model.generate(
                **tok(chat(tok, b.token_counts[0], q), return_tensors="pt"),
                **b.model_inputs(),
                **gen,
            )
        )
    both = pack_visual_items(items, model.config)
    prompts = [chat(tok, n, q) for n, q in zip(both.token_counts, questions, strict=True)]
    batched = model.generate(
        **tok(prompts, return_tensors="pt", padding=True), **both.model_inputs(), **gen
    )
    for i, one in enumerate(single):
        assert batched.sequences[i, -8:].tolist() == one.sequences[0, -8:].tolist()
        for s_one, s_batch in zip(one.scores, batched.scores, strict=True):
            torch.testing.assert_close(s_batch[i], s_one[0], rtol=1e-4, atol=1e-4)
    assert len(set(single[0].sequences[0, -8:].tolist())) > 1  # not a degenerate repeat


@pytest.mark.parametrize("strategy", ["rotary", "slice_avg", "slice_attn", "encoder3d"])
def test_volume_strategies(strategy):
    model, tok = build_preset(f"tiny-ct-{strategy}")
    cfg = model.config
    slices = torch.randn(8, 3, 32, 32)
    slices[4:] = slices[3]  # repeated slices: the rotary strategy prunes them
    item = VisualItem(VisualKind.VOLUME, slices, volume3d=torch.randn(1, 8, 32, 32))
    image = VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 16))
    batch = pack_visual_items([image, item], cfg)
    # slice_avg: one token per patch position (4x4); slice_attn: volume_tokens; encoder3d:
    # a 2x4x4 grid of 4x8x8 patches pooled 1x2x2.
    expected = {"rotary": None, "slice_avg": 16, "slice_attn": 16, "encoder3d": 8}[strategy]
    if expected is not None:
        assert batch.token_counts[1] == expected
    else:
        assert batch.token_counts[1] < batch.unpruned_counts[1] == 8 * 16
    ids = tok(
        chat(tok, sum(batch.token_counts), " findings?", "none"), return_tensors="pt"
    ).input_ids
    out = model(input_ids=ids, labels=ids, **batch.model_inputs())
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"known presets: .*omnivmed-1\.5b"):
        build_preset("omnivmed-3b")


@pytest.mark.parametrize(
    ("preset", "llm_params", "vision_params", "vocab"),
    [
        ("omnivmed-1.5b-shape", 1.54e9, 0.412e9, 151936),
        ("omnivmed-7b-shape", 7.6e9, 0.412e9, 152064),
    ],
)
def test_shape_presets_have_the_released_sizes(preset, llm_params, vision_params, vocab):
    # Built on the meta device: shapes only, no memory, nothing downloaded.
    with torch.device("meta"):
        model, tokenizer = build_preset(preset)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.language_model) == pytest.approx(llm_params, rel=0.01)
    assert count(model.vision_tower) == pytest.approx(vision_params, rel=0.01)
    assert (
        model.vision_tower.config.hidden_size // model.vision_tower.config.num_attention_heads == 72
    )
    # The published vocabulary is kept (the tokenizer's ids, image token included, fit in it).
    assert model.get_input_embeddings().num_embeddings == vocab > len(tokenizer)


def test_package_exports():
    assert omnivmed.build_preset is build_preset
