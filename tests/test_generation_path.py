"""One generation path: omnivmed-infer, omnivmed-eval run and omnivmed-serve give the same
greedy tokens for the same question about the same image, volume and video; the processor
saves itself with the model and is read back as it was (old folders too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import answering_tiny_model

import omnivmed
from omnivmed.cli.eval import main as eval_main
from omnivmed.cli.infer import main as infer_main
from omnivmed.inference import load_for_inference
from omnivmed.models import OmniVMedForConditionalGeneration, VisualKind, build_preset
from omnivmed.models.kinds import MARKERS
from omnivmed.models.loading import ModelLoadError
from omnivmed.models.parts import ModelParts
from omnivmed.processing.processor import (
    PROCESSOR_CONFIG_NAME,
    Media,
    OmniVMedProcessor,
    ProcessorOptions,
)
from omnivmed.processing.visual_batch import VisualBatch

OPTIONS = ProcessorOptions(max_pixels=48 * 48, min_pixels=32 * 32, max_slices=8, video_fps=4.0)
NEW_TOKENS = 8
# kind: (record field, serve part, file under the media root, question)
CASES = {
    VisualKind.IMAGE: ("images", "image_url", "scan.png", "What is shown?"),
    VisualKind.VOLUME: ("volumes", "volume_url", "mri.nii.gz", "Which organ is shown?"),
    VisualKind.VIDEO: ("videos", "video_url", "clip", "Is there bleeding?"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A model folder as omnivmed-train exports it: weights, tokenizer, processor."""
    path = tmp_path_factory.mktemp("model")
    model, tokenizer = answering_tiny_model()
    model.save_pretrained(path)
    OmniVMedProcessor(model.config, tokenizer, OPTIONS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(root / "scan.png")
    volume = np.repeat(rng.random((32, 32, 4)).astype(np.float32), 2, axis=2) * 1000
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "mri.nii.gz")
    (root / "clip").mkdir()
    for i in range(4):
        frame = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(frame).save(root / "clip" / f"{i:03d}.png")
    return root


@pytest.fixture
def generated(monkeypatch) -> list[list[int]]:
    """Every row's new tokens of every `generate` call (padding and end of turn left out)."""
    rows: list[list[int]] = []
    original = OmniVMedForConditionalGeneration.generate

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        start, pad = kwargs["input_ids"].shape[1], kwargs["pad_token_id"]
        eos = kwargs["eos_token_id"]
        stop = set(eos if isinstance(eos, list) else [eos]) | {pad}
        for row in out[:, start:].tolist():
            rows.append([t for t in row if t not in stop])
        return out

    monkeypatch.setattr(OmniVMedForConditionalGeneration, "generate", recording)
    return rows


def test_infer_eval_and_serve_give_the_same_greedy_tokens(
    folder, media, generated, tmp_path, capsys
):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from omnivmed.serving.app import ServeSettings, create_app

    # omnivmed-infer: one call per medium.
    infer = {}
    for kind, (_, _, name, question) in CASES.items():
        args = [str(folder), f"--{kind.name.lower()}", str(media / name), "-q", question]
        assert infer_main([*args, "--json", "--max-new-tokens", str(NEW_TOKENS)]) == 0
        infer[kind] = json.loads(capsys.readouterr().out)["answers"][0]["text"]
    infer_tokens = generated[:]
    assert len(infer_tokens) == len(CASES)

    # omnivmed-eval run: the three records in one batch (left-padded, mixed kinds).
    bench = tmp_path / "bench.jsonl"
    rows = [{"id": kind.name, field: [name],
             "conversations": [{"from": "human", "value": f"{kind.marker}\n{question}"}]}
            for kind, (field, _, name, question) in CASES.items()]  # fmt: skip
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generated.clear()
    assert eval_main(["run", str(folder), "--benchmark", str(bench), "--data-root", str(media),
                      "--out", str(tmp_path / "eval"), "--max-new-tokens", str(NEW_TOKENS),
                      "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    assert len(generated) == len(CASES)  # one generate call of three rows
    eval_tokens = generated[:]
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    evaluated = {VisualKind[r["id"]]: r["prediction"] for r in map(json.loads, lines)}

    # omnivmed-serve: the app over the folder's model and processor, temperature 0.
    model, processor = load_for_inference(folder, device="cpu")
    app = create_app(model, processor, ServeSettings(media_root=media, max_tokens=64))
    served = {}
    generated.clear()
    with TestClient(app) as client:
        for kind, (_, part, name, question) in CASES.items():
            content = [{"type": part, part: {"url": name}}, {"type": "text", "text": question}]
            body = {"messages": [{"role": "user", "content": content}], "temperature": 0,
                    "max_tokens": NEW_TOKENS}  # fmt: skip
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            served[kind] = reply.json()["choices"][0]["message"]["content"]
    serve_tokens = generated[:]

    assert infer_tokens == eval_tokens == serve_tokens
    assert all(0 < len(t) <= NEW_TOKENS for t in infer_tokens)
    assert len({tuple(t) for t in infer_tokens}) > 1  # the answers depend on the medium
    for kind in CASES:
        assert infer[kind] == evaluated[kind] == served[kind].strip(), kind


def test_processor_saves_and_loads_itself(tmp_path, media):
    model, tokenizer = answering_tiny_model()
    saved = OmniVMedProcessor(model.config, tokenizer, OPTIONS)
    path = saved.save_pretrained(tmp_path / "processor")
    assert path.name == PROCESSOR_CONFIG_NAME
    assert not (tmp_path / "processor" / "config.json").exists()  # the processor stands alone
    loaded = OmniVMedProcessor.from_pretrained(tmp_path / "processor")
    assert loaded.options == OPTIONS
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.tokenizer.all_special_tokens == tokenizer.all_special_tokens
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    assert loaded.config.image_token == model.config.image_token
    assert loaded.config.vision_config.patch_size == model.config.vision_config.patch_size
    for kind, (_, _, name, _) in CASES.items():  # the same visual tokens for every kind
        a = saved.encode_media([Media(kind, media / name)])
        b = loaded.encode_media([Media(kind, media / name)])
        assert (a.token_counts, a.unpruned_counts) == (b.token_counts, b.unpruned_counts)
        for key, value in a.model_inputs().items():
            torch.testing.assert_close(b.model_inputs()[key], value, rtol=0, atol=0)
    # Saved again, it reads back the same.
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / PROCESSOR_CONFIG_NAME).read_text() == path.read_text()


@pytest.mark.parametrize("preset", ["tiny-merge", "tiny-ct-slice_attn", "tiny-ct-encoder3d"])
def test_every_part_round_trips(tmp_path, preset):
    model, tokenizer = build_preset(preset)
    OmniVMedProcessor(model.config, tokenizer).save_pretrained(tmp_path)
    loaded = OmniVMedProcessor.from_pretrained(tmp_path)
    for kind, frames, side in ((VisualKind.IMAGE, 1, 4), (VisualKind.VOLUME, 6, 4)):
        assert loaded.parts.token_count(loaded.config, kind, frames, side, side) == ModelParts.of(
            model.config
        ).token_count(model.config, kind, frames, side, side)
    assert loaded.multiple == OmniVMedProcessor(model.config, tokenizer).multiple
    OmniVMedProcessor.from_pretrained(tmp_path, model.config)  # agrees with its model


def test_a_processor_saved_with_another_model_is_refused(tmp_path):
    model, tokenizer = build_preset("tiny")
    other, _ = build_preset("tiny-merge")
    OmniVMedProcessor(other.config, tokenizer).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"saved with another model: model_config\.connector"):
        load_for_inference(tmp_path, device="cpu")


def test_old_model_folders_still_load(tmp_path, media):
    """Folders written before the processor saved itself: a tokenizer and the media
    settings alone (processor_config.json of settings only), or no settings at all."""
    model, tokenizer = answering_tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, processor = load_for_inference(tmp_path, device="cpu")
    assert processor.options == ProcessorOptions()
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    OPTIONS.save(tmp_path)
    assert "model_config" not in json.loads((tmp_path / PROCESSOR_CONFIG_NAME).read_text())
    loaded, processor = load_for_inference(tmp_path, device="cpu")
    assert processor.options == OPTIONS
    assert processor.config is loaded.config
    again = OmniVMedProcessor(model.config, tokenizer, OPTIONS)
    visual = [Media(VisualKind.VOLUME, media / "mri.nii.gz")]
    assert processor.encode_media(visual).token_counts == again.encode_media(visual).token_counts
    # The media settings of a new folder still read as settings alone.
    again.save_pretrained(tmp_path / "new")
    assert ProcessorOptions.from_dir(tmp_path / "new") == OPTIONS


def test_visual_batches_concatenate_in_order(media):
    model, tokenizer = answering_tiny_model()
    processor = OmniVMedProcessor(model.config, tokenizer, OPTIONS)
    batches = [processor.encode_media([Media(k, media / CASES[k][2])]) for k in CASES]
    joined = VisualBatch.concat(batches)
    assert joined.num_items == len(CASES)
    assert joined.token_counts == [b.token_counts[0] for b in batches]
    lengths = [int(torch.diff(b.visual_cu_seqlens)[0]) for b in batches]
    assert joined.visual_cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert joined.visual_cu_seqlens.dtype == torch.int32
    for key in ("pixel_values", "visual_positions", "visual_kinds", "visual_grids"):
        expected = torch.cat([getattr(b, key) for b in batches])
        torch.testing.assert_close(getattr(joined, key), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        VisualBatch.concat([])


def test_markers_are_written_in_one_place():
    """Records, prompts, inference and serving read the markers from models/kinds.py."""
    root = Path(omnivmed.__file__).parent
    literal = re.compile("|".join(re.escape(m) for m in MARKERS))
    for module in ("data/records.py", "processing/prompt.py", "inference/answer.py",
                   "inference/generate.py", "serving/requests.py"):  # fmt: skip
        assert not literal.search((root / module).read_text()), module
