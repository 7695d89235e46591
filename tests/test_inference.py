"""omnivmed-infer and the inference helpers: a saved tiny model answers questions about an
image, a volume and a frame-folder video, reading media with its saved settings."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from omnivmed.cli.infer import main
from omnivmed.models import build_preset
from omnivmed.processing.processor import PROCESSOR_CONFIG_NAME, ProcessorOptions

SETTINGS = ProcessorOptions(max_pixels=64 * 64, min_pixels=32 * 32, max_slices=8, video_fps=4.0)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    SETTINGS.save(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(root / "fundus.png")
    # A volume whose slices repeat in pairs: pruning drops the repeats.
    slices = rng.random((32, 32, 4)).astype(np.float32)
    volume = np.repeat(slices, 2, axis=2) * 1000
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "mri.nii.gz")
    frames = root / "clip"
    frames.mkdir()
    frame = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    for i in range(4):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    return {"image": root / "fundus.png", "volume": root / "mri.nii.gz", "video": frames}


def run_json(capsys, *args) -> dict:
    assert main([*map(str, args), "--json", "--max-new-tokens", "3"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["image", "volume", "video"])
def test_answers_each_question_about_each_kind(capsys, saved_model, media, kind):
    report = run_json(capsys, saved_model, f"--{kind}", media[kind], "-q", "What is shown?",
                      "-q", "Anything abnormal?")  # fmt: skip
    assert report["device"] == "cpu" and report["media"]["kind"] == kind
    assert [a["question"] for a in report["answers"]] == ["What is shown?", "Anything abnormal?"]
    for answer in report["answers"]:
        assert isinstance(answer["text"], str)
        assert 0 < answer["visual_tokens"] <= answer["visual_tokens_unpruned"]
    if kind in ("volume", "video"):  # repeated slices and frames are pruned
        first = report["answers"][0]
        assert first["visual_tokens"] < first["visual_tokens_unpruned"]


def test_saved_settings_are_used_and_flags_override_them(capsys, saved_model, media):
    small = run_json(capsys, saved_model, "--image", media["image"], "-q", "?")["answers"][0]
    large = run_json(capsys, saved_model, "--image", media["image"], "-q", "?",
                     "--max-pixels", 128 * 128, "--min-pixels", 96 * 96)["answers"][0]  # fmt: skip
    assert large["visual_tokens"] > small["visual_tokens"]
    whole = run_json(capsys, saved_model, "--volume", media["volume"], "-q", "?", "--no-prune")
    assert whole["answers"][0]["visual_tokens"] == whole["answers"][0]["visual_tokens_unpruned"]


def test_plain_text_output(capsys, saved_model, media):
    assert main([str(saved_model), "--image", str(media["image"]), "-q", "What?",
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "visual tokens" in out and "Q: What?" in out and "A: " in out


def test_clear_errors(capsys, tmp_path, saved_model, media):
    assert main([str(tmp_path), "--image", str(media["image"]), "-q", "?"]) == 2
    assert "no saved model here" in capsys.readouterr().err
    missing = tmp_path / "nope.png"
    assert main([str(saved_model), "--image", str(missing), "-q", "?"]) == 2
    assert "nope.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two media at once
        main([str(saved_model), "--image", "a.png", "--video", "b.mp4", "-q", "?"])
    with pytest.raises(SystemExit):  # no question
        main([str(saved_model), "--image", str(media["image"])])


def test_processor_settings_round_trip_and_reject_unknown_keys(tmp_path):
    SETTINGS.save(tmp_path)
    assert ProcessorOptions.from_dir(tmp_path) == SETTINGS
    assert ProcessorOptions.from_dir(tmp_path / "elsewhere") == ProcessorOptions()
    (tmp_path / PROCESSOR_CONFIG_NAME).write_text(json.dumps({"max_pixel": 5}))
    with pytest.raises(ValueError, match=r"unknown settings \['max_pixel'\]"):
        ProcessorOptions.from_dir(tmp_path)
