"""MedM-VL's encoders as released: stock SigLIP (learned position embedding, fixed size)
against transformers' `SiglipVisionModel`; the fixed-position-embedding ablation of the
rotary tower; M3D-CLIP's 3D ViT loaded from its own key layout against an independent
reference of its forward; the slice-attention compressor's key positions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from omnivmed.models import (
    OmniVMedConfig,
    OmniVMedEncoder3DConfig,
    VisualKind,
    VolumeItem,
    build_model,
    build_preset,
    build_tiny_tokenizer,
    m3d_encoder3d_config,
)
from omnivmed.processing import patchify
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from omnivmed_ext import frame_positions

TINY_LLM = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
SIGLIP = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP))
    with torch.no_grad():  # a position embedding far from zero, so a wrong one shows
        getattr(model, "vision_model", model).embeddings.position_embedding.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    return path


def _tower_on(tower, pixels: torch.Tensor) -> torch.Tensor:
    ps = tower.config.patch_size
    gh, gw = pixels.shape[-2] // ps, pixels.shape[-1] // ps
    patches = patchify(pixels, ps)[0]
    cu = torch.tensor([0, gh * gw], dtype=torch.int32)
    return tower(patches, frame_positions(1, gh, gw), cu)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_siglip_encoder_equals_siglip_vision_model(siglip_dir, size):
    model, _ = build_model(vision=str(siglip_dir), vision_encoder="siglip", llm=TINY_LLM,
                           tokenizer=build_tiny_tokenizer())  # fmt: skip
    tower = model.vision_tower.eval()
    reference = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference(
            pixel_values=pixels, interpolate_pos_encoding=size != (32, 32)
        ).last_hidden_state[0]
        got = _tower_on(tower, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_siglip_encoder_packs_items_of_other_grids_independently(siglip_dir):
    model, _ = build_model(vision=str(siglip_dir), vision_encoder="siglip", llm=TINY_LLM,
                           tokenizer=build_tiny_tokenizer())  # fmt: skip
    tower = model.vision_tower.eval()
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 24, 40)
    pa, pb = patchify(a, 8)[0], patchify(b, 8)[0]
    pos = torch.cat((frame_positions(1, 4, 4), frame_positions(1, 3, 5)))
    cu = torch.tensor([0, 16, 31], dtype=torch.int32)
    with torch.no_grad():
        packed = tower(torch.cat((pa, pb)), pos, cu)
        torch.testing.assert_close(packed[:16], _tower_on(tower, a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[16:], _tower_on(tower, b), rtol=1e-5, atol=1e-5)


def test_siglip_encoder_processor_uses_the_fixed_size_and_never_prunes(tmp_path):
    from PIL import Image

    model, tok = build_preset("tiny-siglip")
    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    np.save(tmp_path / "v.npy", np.zeros((6, 20, 30), dtype=np.float32))  # identical slices
    processor = OmniVMedProcessor(model.config, tok, ProcessorOptions(prune=True))
    image = processor.load(Media(VisualKind.IMAGE, tmp_path / "x.png"))
    assert tuple(image.frames.shape[-2:]) == (32, 32)
    sample = processor(
        [{"from": "human", "value": "<image3d> what?"}, {"from": "gpt", "value": "x"}],
        [Media(VisualKind.VOLUME, tmp_path / "v.npy")],
    )
    assert sample["visual"].token_counts == [6 * 16]  # nothing pruned, 4x4 patches per slice


def test_siglip_encoder_config_and_checkpoint_errors(siglip_dir):
    with pytest.raises(ValueError, match="needs position_encoding='learned'"):
        OmniVMedConfig(vision_config=dict(SIGLIP), vision_encoder="siglip")
    with pytest.raises(
        ValueError, match=r"position_embedding.weight has shape \(16, 64\).*\(36, 64\)"
    ):
        build_model(vision=str(siglip_dir), vision_encoder="siglip", llm=TINY_LLM,
                    vision_config={"image_size": 48}, tokenizer=build_tiny_tokenizer())  # fmt: skip


def test_rotary_tower_with_learned_positions_is_the_fixed_pe_ablation(siglip_dir):
    rope, _ = build_model(vision=str(siglip_dir), llm=TINY_LLM, tokenizer=build_tiny_tokenizer())
    fixed, _ = build_model(vision=str(siglip_dir), llm=TINY_LLM, tokenizer=build_tiny_tokenizer(),
                           vision_config={"position_encoding": "learned"})  # fmt: skip
    assert not hasattr(rope.vision_tower, "position_embedding")
    report = fixed.vision_tower.load_pretrained(siglip_dir)
    assert "position_embedding.weight" in report["loaded"]
    reference = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[0]
        torch.testing.assert_close(
            _tower_on(fixed.vision_tower.eval(), pixels), expected, rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(_tower_on(rope.vision_tower.eval(), pixels), expected, atol=1e-2)
    # Unlike stock SigLIP it stays native-resolution and prunable.
    assert fixed.config.vision_encoder == "rotary_siglip"
    processor = OmniVMedProcessor(fixed.config, build_tiny_tokenizer())
    assert processor.fixed_size is None and processor.parts.may_prune(VisualKind.VIDEO)


# ---- M3D-CLIP --------------------------------------------------------------------------
M3D_TINY = dict(in_channels=1, img_size=[8, 32, 32], patch_size=[4, 8, 8], hidden_size=64,
                mlp_dim=96, num_layers=2, num_heads=4)  # fmt: skip


def _m3d_checkpoint(path: Path, prefix: str, channels: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in M3D-CLIP's own key layout (MONAI 1.3 ViT, perceptron patch
    embedding, class token, bias-free qkv), with a text tower and MONAI>=1.4 cross-attention
    keys to be skipped, and M3D-CLIP's config.json."""
    cfg = dict(M3D_TINY, in_channels=channels)
    d, mlp, (pd, ph, pw) = cfg["hidden_size"], cfg["mlp_dim"], cfg["patch_size"]
    n = math.prod(s // p for s, p in zip(cfg["img_size"], cfg["patch_size"], strict=True))
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    w = {
        "cls_token": r(1, 1, d),
        "patch_embedding.position_embeddings": r(1, n, d),
        "patch_embedding.patch_embeddings.1.weight": r(d, pd * ph * pw * channels),
        "patch_embedding.patch_embeddings.1.bias": r(d),
        "norm.weight": 1 + r(d),
        "norm.bias": r(d),
    }
    for i in range(cfg["num_layers"]):
        b = f"blocks.{i}."
        w.update({
            b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d),
            b + "attn.qkv.weight": r(3 * d, d),
            b + "attn.out_proj.weight": r(d, d), b + "attn.out_proj.bias": r(d),
            b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d),
            b + "mlp.linear1.weight": r(mlp, d), b + "mlp.linear1.bias": r(mlp),
            b + "mlp.linear2.weight": r(d, mlp), b + "mlp.linear2.bias": r(d),
            b + "cross_attn.to_q.weight": r(d, d), b + "norm_cross_attn.weight": r(d),
        })  # fmt: skip
    state = {prefix + k: v for k, v in w.items()}
    state["language_encoder.embeddings.word_embeddings.weight"] = r(30, d)
    state["mm_vision_proj.weight"] = r(d, d)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "m3d_clip", **cfg}))
    return w


def _m3d_reference(w: dict[str, torch.Tensor], volume: torch.Tensor, cfg: dict) -> torch.Tensor:
    """M3D's ViT forward written from its definition: [B, C, D, H, W] -> the normed patch
    tokens (class token dropped), as M3D-LaMed uses them."""
    b, c = volume.shape[:2]
    (pd, ph, pw), heads = cfg["patch_size"], cfg["num_heads"]
    gd, gh, gw = (s // p for s, p in zip(volume.shape[2:], cfg["patch_size"], strict=True))
    x = volume.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    x = x.reshape(b, gd * gh * gw, pd * ph * pw * c)  # (p1 p2 p3 c), channel fastest

    def ln(t, p):
        return torch.nn.functional.layer_norm(
            t, t.shape[-1:], w[p + ".weight"], w[p + ".bias"], 1e-5
        )

    x = (
        x @ w["patch_embedding.patch_embeddings.1.weight"].T
        + w["patch_embedding.patch_embeddings.1.bias"]
    )
    x = x + w["patch_embedding.position_embeddings"]
    x = torch.cat((w["cls_token"].expand(b, -1, -1), x), dim=1)
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        qkv = (h @ w[p + "attn.qkv.weight"].T).reshape(b, -1, 3, heads, x.shape[-1] // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, x.shape[-1])
        x = x + o @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"]
        h = ln(x, p + "norm2")
        h = torch.nn.functional.gelu(h @ w[p + "mlp.linear1.weight"].T + w[p + "mlp.linear1.bias"])
        x = x + h @ w[p + "mlp.linear2.weight"].T + w[p + "mlp.linear2.bias"]
    return ln(x, "norm")[:, 1:]


@pytest.mark.parametrize(
    ("prefix", "channels"),
    [("vision_encoder.", 1), ("model.vision_tower.vision_tower.", 1), ("", 2)],
)
def test_m3d_clip_checkpoint_loads_into_encoder3d(tmp_path, prefix, channels):
    w = _m3d_checkpoint(tmp_path / "m3d", prefix, channels)
    model, _ = build_model(
        vision=dict(SIGLIP), llm=TINY_LLM, tokenizer=build_tiny_tokenizer(),
        volume_strategy="encoder3d", volume_encoder=str(tmp_path / "m3d"),
        encoder3d_config={"pool": [2, 2, 2]},
    )  # fmt: skip
    encoder = model.encoder3d.eval()
    c3 = model.config.encoder3d_config
    assert (c3.volume_size, c3.patch_size_3d, c3.num_channels) == ([8, 32, 32], [4, 8, 8], channels)
    assert c3.cls_token and c3.num_output_tokens == 4  # (2x4x4 patches) / (2x2x2)
    volume = torch.rand(2, channels, 8, 32, 32)
    with torch.no_grad():
        got = encoder.patch_features(volume)
        torch.testing.assert_close(
            got, _m3d_reference(w, volume, dict(M3D_TINY)), rtol=1e-5, atol=1e-5
        )
        pooled = encoder(volume)
    grid = got.transpose(1, 2).reshape(2, 64, 2, 4, 4)
    expected = torch.nn.functional.avg_pool3d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected)
    # The model answers with 4 tokens per volume and the whole pipeline runs.
    item = VolumeItem(1, 1, 1, volume=volume[0])
    assert model.volume_strategy.encode(item)[0].shape == (4, 64)


def test_m3d_report_and_bad_checkpoints(tmp_path):
    _m3d_checkpoint(tmp_path / "m3d", "vision_encoder.")
    encoder_cfg = OmniVMedConfig(
        vision_config=dict(SIGLIP), volume_strategy="encoder3d",
        encoder3d_config=m3d_encoder3d_config(tmp_path / "m3d"),
    )  # fmt: skip
    from omnivmed.models.volume import Encoder3DVolume

    report = Encoder3DVolume(encoder_cfg).load_pretrained(tmp_path / "m3d")
    assert report["missing"] == []
    assert len(report["zero_filled"]) == 2  # the bias-free qkv of each block
    assert "language_encoder.embeddings.word_embeddings.weight" in report["skipped"]
    assert any("cross_attn" in k for k in report["skipped"])
    wrong = OmniVMedConfig(
        vision_config=dict(SIGLIP), volume_strategy="encoder3d",
        encoder3d_config=m3d_encoder3d_config(tmp_path / "m3d", volume_size=[8, 64, 64]),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"position_embeddings has shape \(32, 64\).*\(128, 64\)"):
        Encoder3DVolume(wrong).load_pretrained(tmp_path / "m3d")
    no_cls = OmniVMedConfig(
        vision_config=dict(SIGLIP), volume_strategy="encoder3d",
        encoder3d_config=m3d_encoder3d_config(tmp_path / "m3d", cls_token=False),
    )  # fmt: skip
    with pytest.raises(ValueError, match="has a class token"):
        Encoder3DVolume(no_cls).load_pretrained(tmp_path / "m3d")
    (tmp_path / "empty").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "empty" / "model.safetensors"))
    with pytest.raises(ValueError, match="expected one M3D vision encoder"):
        Encoder3DVolume(encoder_cfg).load_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="name the strategy too"):
        build_model(vision=dict(SIGLIP), llm=TINY_LLM, tokenizer=build_tiny_tokenizer(),
                    volume_encoder=str(tmp_path / "m3d"))  # fmt: skip


def test_medmvl_geometry_gives_256_tokens():
    assert m3d_encoder3d_config(pool=[2, 2, 2]).num_output_tokens == 256
    assert m3d_encoder3d_config().num_output_tokens == 512  # the default (1, 2, 2) pooling
    assert OmniVMedEncoder3DConfig().num_output_tokens == 512


# ---- slice attention -------------------------------------------------------------------
@pytest.mark.parametrize("key_positions", [False, True])
def test_slice_attention_key_positions(key_positions):
    config = OmniVMedConfig(
        vision_config=dict(SIGLIP, position_encoding="rope"), volume_strategy="slice_attn",
        volume_tokens=3, volume_key_positions=key_positions,
    )  # fmt: skip
    from omnivmed.models.volume import SliceAttention

    strategy = SliceAttention(config).eval()
    frames, gh, gw = 4, 2, 3
    features = torch.randn(frames * gh * gw, 64)
    positions = frame_positions(frames, gh, gw)
    out, _ = strategy.encode(VolumeItem(frames, gh, gw, features, positions))
    assert out.shape == (3, 64)
    # Slices in another order: without key positions the pooling cannot tell.
    order = torch.arange(frames * gh * gw).view(frames, -1).flip(0).reshape(-1)
    shuffled, _ = strategy.encode(VolumeItem(frames, gh, gw, features[order], positions))
    assert torch.allclose(out, shuffled, atol=1e-5) == (not key_positions)


# ---- the rotary tower's layer path -----------------------------------------------------


def _rotary_tower(layers: int = 2):
    from omnivmed.models.configuration import OmniVMedVisionConfig
    from omnivmed.models.encoders.rotary_siglip import RotaryVisionTower

    torch.manual_seed(0)
    config = OmniVMedVisionConfig(hidden_size=128, intermediate_size=256, patch_size=8,
                                  num_hidden_layers=layers, num_attention_heads=2)  # fmt: skip
    return RotaryVisionTower(config).eval()


def _pack(tower, lengths=(16, 12, 32)):
    positions = torch.cat([frame_positions(1, 4, n // 4) for n in lengths])
    patches = torch.randn(positions.shape[0], tower.config.patch_values)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    return patches, positions, cu


def test_rotary_tower_qkv_is_one_product_of_the_checkpoint_weights():
    attention = _rotary_tower().layers[0].self_attn
    hidden = torch.randn(7, 128)
    qkv = attention.qkv_projection(hidden)
    for i, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        torch.testing.assert_close(qkv[:, i].reshape(7, -1), proj(hidden))
    assert {"q_proj.weight", "k_proj.bias", "v_proj.weight"} <= set(attention.state_dict())


def test_rotary_tower_layers_compile_without_graph_breaks():
    tower = _rotary_tower()
    patches, positions, cu = _pack(tower)
    with torch.no_grad():
        eager = tower(patches, positions, cu)
        hidden = tower.patch_embedding(patches)
        explained = torch._dynamo.explain(tower.layers[0])(hidden, positions, cu, 32)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    tower.compile_layers(fullgraph=True, backend="aot_eager")
    patches.requires_grad_()
    compiled = tower(patches, positions, cu)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    compiled.sum().backward()  # the backward compiles too
    assert patches.grad is not None and torch.isfinite(patches.grad).all()
    torch._dynamo.reset()


def test_rotary_tower_layer_path_reads_no_device_values():
    # Host reads belong to the pack preparation in SiglipTower.forward, never to a layer.
    import inspect

    from omnivmed.models.encoders import siglip_tower

    for part in (siglip_tower.VisionLayer, siglip_tower.VisionAttention, siglip_tower.VisionMLP):
        source = inspect.getsource(part)
        for call in (".item(", ".tolist(", "int(", ".cpu(", ".numpy("):
            assert call not in source, f"{part.__name__} calls {call}"
