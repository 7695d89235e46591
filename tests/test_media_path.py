"""The data path as OmniV-Med means it: a visual-token cap that counts kept tokens (pixel
budget first, then frames), one owner for media settings shared by training and
inference, M3D's pre-normalised arrays, true time and slice positions, a sequence limit,
and learning rates fit for full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnivmed.configs import packaged_config
from omnivmed.data import InstructionDataset, load_records
from omnivmed.models import VisualKind, build_preset
from omnivmed.processing.errors import MediaError
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from omnivmed.training.config import ConfigError, StageConfig, load_stage_config

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


def _volume(path: Path, frames: int = 12, repeat: int = 1, size: int = 64) -> Path:
    """A .npy volume whose slices come in runs of `repeat` identical ones."""
    rng = np.random.default_rng(0)
    distinct = rng.random((frames // repeat, size, size)).astype(np.float32)
    np.save(path, np.repeat(distinct, repeat, axis=0))
    return path


def _conv(marker: str) -> list[dict]:
    return [{"from": "human", "value": f"{marker} what?"}, {"from": "gpt", "value": "x"}]


# ---- the cap -----------------------------------------------------------------------------
def test_cap_counts_kept_tokens_not_unpruned_ones(tiny, tmp_path):
    model, tok = tiny
    path = _volume(tmp_path / "v.npy", frames=16, repeat=4)  # 4 distinct slices, each x4
    options = ProcessorOptions(max_pixels=64 * 64, min_pixels=16 * 16, max_visual_tokens=300,
                               prune_threshold=0.01)  # fmt: skip
    visual = OmniVMedProcessor(model.config, tok, options)(
        _conv("<image3d>"), [Media(VisualKind.VOLUME, path)]
    )["visual"]
    frames, gh, gw = visual.visual_grids[0].tolist()
    # 16 x 64 = 1024 unpruned tokens, 4 x 64 = 256 kept: everything fits, nothing shrinks.
    assert (frames, gh, gw) == (16, 8, 8)
    assert visual.unpruned_counts == [1024] and visual.token_counts == [256]


def test_over_the_cap_the_pixel_budget_shrinks_before_frames(tiny, tmp_path):
    model, tok = tiny
    path = _volume(tmp_path / "v.npy", frames=8)  # every slice different: nothing pruned
    options = ProcessorOptions(max_pixels=64 * 64, min_pixels=16 * 16, max_visual_tokens=200)
    proc = OmniVMedProcessor(model.config, tok, options)
    visual = proc.encode_media([Media(VisualKind.VOLUME, path)])
    frames, gh, gw = visual.visual_grids[0].tolist()
    assert frames == 8 and gh * gw < 64  # all slices kept, consecutive; each smaller
    assert visual.token_counts[0] <= 200
    # At the smallest budget, frames go (evenly), and pruning runs again.
    small = proc.encode_media([Media(VisualKind.VOLUME, path)])
    tight = OmniVMedProcessor(
        model.config, tok, options.replace(min_pixels=32 * 32, max_visual_tokens=40)
    )
    thinned = tight.encode_media([Media(VisualKind.VOLUME, path)])
    assert small.visual_grids[0, 0] == 8
    frames, gh, gw = thinned.visual_grids[0].tolist()
    assert (gh, gw) == (4, 4) and frames < 8 and thinned.token_counts[0] <= 40


def test_many_images_are_downsized_not_refused(tiny, tmp_path):
    from PIL import Image

    model, tok = tiny
    rng = np.random.default_rng(1)
    media = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        media.append(Media(VisualKind.IMAGE, tmp_path / f"{i}.png"))
    options = ProcessorOptions(max_pixels=64 * 64, min_pixels=16 * 16, max_visual_tokens=120)
    visual = OmniVMedProcessor(model.config, tok, options).encode_media(media)
    assert sum(visual.token_counts) <= 120 and len(visual.token_counts) == 6


def test_a_cap_too_small_for_one_frame_names_the_sample_and_setting(tiny, tmp_path):
    model, tok = tiny
    path = _volume(tmp_path / "v.npy", frames=4)
    options = ProcessorOptions(max_pixels=64 * 64, min_pixels=32 * 32, max_visual_tokens=3)
    with pytest.raises(
        ValueError,
        match=r"sample 'tiny-cap'.*exceed max_visual_tokens = 3 even at min_pixels = 1024",
    ):
        OmniVMedProcessor(model.config, tok, options)(
            _conv("<image3d>"), [Media(VisualKind.VOLUME, path)], "tiny-cap"
        )


def test_fixed_cost_items_are_left_whole_while_others_shrink(tmp_path):
    model, tok = build_preset("tiny-ct-slice_avg")
    volume = _volume(tmp_path / "v.npy", frames=8)
    video = _volume(tmp_path / "frames.npy", frames=8)  # a volume file read as slices
    options = ProcessorOptions(
        max_pixels=64 * 64, min_pixels=64 * 64, max_visual_tokens=64 + 4 * 64
    )
    proc = OmniVMedProcessor(model.config, tok, options)
    visual = proc.encode_media([Media(VisualKind.VOLUME, volume), Media(VisualKind.VOLUME, video)])
    assert visual.token_counts == [64, 64]  # slice_avg: one token per position whatever the slices
    assert visual.visual_grids[:, 0].tolist() == [8, 8]


# ---- one owner, the same tokens in training and inference ---------------------------------
def test_training_and_inference_see_the_same_visual_tokens(tiny, tmp_path):
    from omnivmed.inference.answer import answer_questions

    model, tok = tiny
    path = _volume(tmp_path / "v.npy", frames=10, repeat=2)
    cfg = load_stage_config(packaged_config("stage3"), data=str(tmp_path / "none.json"), name="s3",
                            media={"max_pixels": 48 * 48, "min_pixels": 16 * 16, "max_visual_tokens": 150})  # fmt: skip
    cfg.media.save(tmp_path)  # what export writes next to the model
    saved = ProcessorOptions.from_dir(tmp_path)
    assert saved == cfg.media
    train = OmniVMedProcessor(model.config, tok, cfg.media)(
        _conv("<image3d>"), [Media(VisualKind.VOLUME, path)]
    )["visual"]
    infer = OmniVMedProcessor(model.config, tok, saved).encode_media(
        [Media(VisualKind.VOLUME, path)]
    )
    for key, value in train.model_inputs().items():
        torch.testing.assert_close(infer.model_inputs()[key], value, rtol=0, atol=0)
    processor = OmniVMedProcessor(model.config, tok, saved)
    answer = answer_questions(model.eval(), processor, VisualKind.VOLUME, path, ["what?"], 2)[0]
    assert (answer.visual_tokens, answer.visual_tokens_unpruned) == (
        train.token_counts[0],
        train.unpruned_counts[0],
    )


def test_media_settings_live_in_the_stage_once():
    cfg = StageConfig(name="m", media={"max_pixels": 1e5, "video_frames": 8})
    assert cfg.media.max_pixels == 100000 and cfg.media.video_frames == 8
    assert not any(hasattr(cfg, k) for k in ("max_pixels", "prune_threshold", "video_fps"))
    with pytest.raises(ConfigError, match=r"media: unknown settings \['max_pixel'\]"):
        StageConfig(name="m", media={"max_pixel": 10})
    assert not hasattr(build_preset("tiny")[0].config, "prune_threshold")  # not the model's


def test_packaged_learning_rates_fit_full_fine_tuning():
    for name in ("stage2", "stage3", "medmvl_stage2"):
        cfg = load_stage_config(packaged_config(name), name=name)
        assert cfg.lr <= 2e-5 and all(lr < cfg.lr for lr in cfg.module_lr.values()), name
    stage1 = load_stage_config(packaged_config("stage1"), name="s1")
    assert stage1.lr == 1e-3 and stage1.module_lr["vision_tower"] <= 0.1 * stage1.lr


# ---- pre-normalised arrays (M3D's layout) -------------------------------------------------
def test_m3d_arrays_load_as_shipped(tiny, tmp_path):
    model, tok = tiny
    rng = np.random.default_rng(2)
    m3d = rng.random((1, 6, 32, 32)).astype(np.float32)  # C, D, H, W in [0, 1]
    np.save(tmp_path / "m3d.npy", m3d)
    proc = OmniVMedProcessor(
        model.config,
        tok,
        ProcessorOptions(intensity="none", max_pixels=32 * 32, min_pixels=32 * 32),
    )
    read = proc.read(Media(VisualKind.VOLUME, tmp_path / "m3d.npy"))
    np.testing.assert_array_equal(read.frames01, m3d[0])  # not re-normalised
    auto = OmniVMedProcessor(model.config, tok).read(Media(VisualKind.VOLUME, tmp_path / "m3d.npy"))
    assert not np.allclose(auto.frames01, m3d[0])  # percentiles would have stretched it
    per_record = proc.read(
        Media(VisualKind.VOLUME, tmp_path / "m3d.npy", {"intensity": "percentile"})
    )
    np.testing.assert_allclose(per_record.frames01, auto.frames01)
    rgb = rng.random((3, 5, 16, 16)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    assert proc.read(Media(VisualKind.VOLUME, tmp_path / "rgb.npy")).frames01.shape == (
        5,
        16,
        16,
        3,
    )


@pytest.mark.parametrize(
    ("array", "options", "message"),
    [(np.zeros((3, 3, 8, 8), np.float32), {}, r"ambiguous layout \(3, 3, 8, 8\)"),
     (np.zeros((2, 4, 8, 8), np.float32), {}, "C = 1 or 3"),
     (np.full((4, 8, 8), 300.0, np.float32), {"intensity": "none"}, r"found \[300, 300\]")],
)  # fmt: skip
def test_bad_arrays(tiny, tmp_path, array, options, message):
    model, tok = tiny
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(MediaError, match=message):
        OmniVMedProcessor(model.config, tok).read(
            Media(VisualKind.VOLUME, tmp_path / "a.npy", options)
        )


def test_intensity_per_dataset_in_a_mixture(tiny, tmp_path):
    from omnivmed.data.mixture import load_mixture

    model, tok = tiny
    np.save(tmp_path / "m3d.npy", np.full((1, 4, 16, 16), 0.25, np.float32))
    (tmp_path / "d.json").write_text(
        json.dumps([{"id": "a", "volumes": ["m3d.npy"], "conversations": _conv("<image3d>")}])
    )
    (tmp_path / "mix.yaml").write_text("datasets:\n  - {path: d.json, intensity: none}\n")
    proc = OmniVMedProcessor(
        model.config, tok, ProcessorOptions(max_pixels=16 * 16, min_pixels=16 * 16, prune=False)
    )
    sample = load_mixture(tmp_path / "mix.yaml", proc)[0]
    # 0.25 kept as is: (0.25 - 0.5) / 0.5 = -0.5 after SigLIP's normalisation.
    torch.testing.assert_close(
        sample["visual"].pixel_values, torch.full_like(sample["visual"].pixel_values, -0.5)
    )
    (tmp_path / "bad.yaml").write_text("datasets:\n  - {path: d.json, intensity: raw}\n")
    with pytest.raises(ValueError, match="intensity must be one of"):
        load_mixture(tmp_path / "bad.yaml", proc)


# ---- true positions ------------------------------------------------------------------------
def _series(folder: Path, spacing_mm: float, count: int) -> Path:
    from pydicom.data import get_testdata_file

    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, spacing_mm * i]
        ds.PixelData = (
            rng.integers(0, 1000, ds.pixel_array.shape, dtype=np.int16)
            .astype(ds.pixel_array.dtype)
            .tobytes()
        )
        ds.save_as(folder / f"{i}.dcm")
    return folder


def test_true_positions_from_slice_spacing_and_frame_times(tiny, tmp_path):
    import av

    model, tok = tiny
    series = _series(tmp_path / "ct", spacing_mm=2.5, count=9)
    options = ProcessorOptions(max_pixels=32 * 32, min_pixels=32 * 32, max_slices=3, prune=False,
                               true_positions=True, mm_per_t=2.5)  # fmt: skip
    proc = OmniVMedProcessor(model.config, tok, options)
    visual = proc.encode_media([Media(VisualKind.VOLUME, series)])
    assert sorted(set(visual.visual_positions[:, 0].tolist())) == [0, 4, 8]  # slices 0, 4, 8 of 9
    by_index = OmniVMedProcessor(model.config, tok, options.replace(true_positions=False))
    assert sorted(
        set(
            by_index.encode_media([Media(VisualKind.VOLUME, series)])
            .visual_positions[:, 0]
            .tolist()
        )
    ) == [0, 1, 2]

    with av.open(str(tmp_path / "clip.mp4"), "w") as container:  # 3 s at 10 fps
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(30):
            container.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(
                        np.full((32, 32, 3), 8 * k, np.uint8), format="rgb24"
                    )
                )
            )
        container.mux(stream.encode())
    clip = options.replace(video_fps=2.0, seconds_per_t=0.5, max_video_frames=4)
    video = OmniVMedProcessor(model.config, tok, clip).encode_media(
        [Media(VisualKind.VIDEO, tmp_path / "clip.mp4")]
    )
    # 2 fps over 3 s = frames at 0, .5, ..., 2.5 s; thinned to 4 (0, 1, 1.5|2, 2.5 s) -> t in half-seconds
    t = sorted(set(video.visual_positions[:, 0].tolist()))
    assert t[0] == 0 and t[-1] == 5 and len(t) == 4


def test_true_positions_without_a_clock_or_spacing_are_errors(tiny, tmp_path):
    from PIL import Image

    model, tok = tiny
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(true_positions=True))
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        Image.fromarray(np.full((16, 16, 3), 50 * k, np.uint8)).save(frames / f"{k}.png")
    with pytest.raises(MediaError, match="true_positions needs frame times"):
        proc.read(Media(VisualKind.VIDEO, frames))
    np.save(tmp_path / "v.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(MediaError, match="true_positions needs slice positions"):
        proc.read(Media(VisualKind.VOLUME, tmp_path / "v.npy"))
    series = _series(tmp_path / "ct", spacing_mm=1.0, count=4)
    coarse = OmniVMedProcessor(
        model.config, tok, ProcessorOptions(true_positions=True, mm_per_t=5.0)
    )
    with pytest.raises(MediaError, match=r"mm_per_t = 5\.0 puts two sampled frames at one t"):
        coarse.read(Media(VisualKind.VOLUME, series))


# ---- the sequence limit ---------------------------------------------------------------------
def test_sequences_over_the_limit_are_errors_or_counted_skips(tiny, tmp_path):
    model, tok = tiny
    path = _volume(tmp_path / "v.npy", frames=4)
    (tmp_path / "d.json").write_text(
        json.dumps([{"id": "long", "volumes": ["v.npy"], "conversations": _conv("<image3d>")}])
    )
    options = ProcessorOptions(
        max_pixels=32 * 32, min_pixels=32 * 32, prune=False, max_sequence_length=20
    )
    proc = OmniVMedProcessor(model.config, tok, options)
    with pytest.raises(
        ValueError, match=r"sample 'long': \d+ tokens \(64 visual\) exceed max_sequence_length = 20"
    ):
        proc(_conv("<image3d>"), [Media(VisualKind.VOLUME, path)], "long")
    skipping = InstructionDataset(load_records(tmp_path / "d.json"), proc, on_error="skip")
    assert skipping[0] is None


# ---- token statistics at dataset scale -------------------------------------------------------
def test_token_statistics_command(tmp_path, capsys):
    from omnivmed.cli.data import main

    _volume(tmp_path / "v.npy", frames=8, repeat=4)  # 2 distinct slices, each x4
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    records = [
        {"id": "ct", "modality": "CT", "volumes": ["v.npy"], "conversations": _conv("<image3d>")},
        {"id": "img", "images": ["x.png"], "conversations": _conv("<image>")},
        {"id": "gone", "images": ["missing.png"], "conversations": _conv("<image>")},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code = main(["tokens", str(tmp_path / "d.json"), "--preset", "tiny", "--out", str(tmp_path / "out"),
                 "--set", "media.max_pixels=4096", "--set", "media.prune_threshold=0.01"])  # fmt: skip
    assert code == 0
    stats = {
        m["modality"]: m
        for m in json.loads((tmp_path / "out" / "token_stats.json").read_text())["modalities"]
    }
    assert stats["CT"]["unpruned"] == 8 * 64 and stats["CT"]["pruned"] == 2 * 64
    assert stats["image"]["reduction"] == 0.0
    assert (tmp_path / "out" / "token_stats.png").stat().st_size > 1000
    assert "1 samples could not be read" in capsys.readouterr().out
    assert (
        main(["tokens", str(tmp_path / "d.json"), "--preset", "tiny", "--set", "max_pixels=1"]) == 2
    )
