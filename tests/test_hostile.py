"""A corpus of hostile inputs, each with the outcome it must have: a clear error that names
the file, field or flag (never a hang, a traceback, code execution or a silent wrong
result). Media and model folders are built here, byte for byte, so the corpus is
reproducible; CLI cases check the exit status and the one-line message."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omnivmed.data.records import RecordError, load_records
from omnivmed.models import build_preset
from omnivmed.models.loading import ModelLoadError, load_saved_model
from omnivmed.processing.errors import MediaError
from omnivmed.processing.processor import ProcessorOptions
from omnivmed.processing.readers import read_image, read_video, read_volume


# ---- media -----------------------------------------------------------------------------
def _png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression bomb's
    header; the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))  # fmt: skip
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _float_tiff_with_nan(path: Path) -> Path:
    from PIL import Image

    arr = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    arr[3, 5] = np.nan
    Image.fromarray(arr, mode="F").save(path)
    return path


def _npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def _dicom(path: Path, series: str, rgb: bool = False, position: float = 0.0) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series, f"series {series[-1]}"
    ds.Rows, ds.Columns = 8, 8
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, position], [1, 0, 0, 0, 1, 0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.zeros((8, 8), np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_folder(path: Path, series: list[str], rgb: bool = False) -> Path:
    path.mkdir()
    for i, uid in enumerate(series):
        _dicom(path / f"{i}.dcm", uid, rgb=rgb, position=float(i))
    return path


@dataclass
class MediaCase:
    name: str
    make: Callable[[Path], Path]
    read: Callable[[Path], object]
    message: str  # regex the error must match


MEDIA_CASES = [
    MediaCase("named pipe as a volume", lambda d: _fifo(d / "pipe.npy"), read_volume,
              "expected a regular file, found a named pipe"),
    MediaCase("named pipe as an image", lambda d: _fifo(d / "pipe.png"), read_image,
              "expected a regular file, found a named pipe"),
    MediaCase("named pipe as a video", lambda d: _fifo(d / "pipe.mp4"), read_video,
              "expected a regular file, found a named pipe"),
    MediaCase("a device as an image", lambda d: Path("/dev/zero"), read_image,
              "expected a regular file, found a device"),
    MediaCase("PNG claiming 13000x13000", lambda d: _png(d / "bomb.png", 13000, 13000), read_image,
              r"declares 13000x13000 pixels, which need about 7\.6 GiB"),
    MediaCase("PNG claiming 100000x100000", lambda d: _png(d / "bomb.png", 100000, 100000),
              read_image, r"declares too many pixels \(Image size \(10000000000 pixels\)"),
    MediaCase("NaN pixel in a float TIFF", lambda d: _float_tiff_with_nan(d / "nan.tif"),
              read_image, "1 voxels are NaN or infinite"),
    MediaCase("complex .npy", lambda d: _npy(d / "c.npy", np.ones((3, 4, 4), np.complex64)),
              read_volume, r"complex values \(dtype complex64\)"),
    MediaCase("string .npy", lambda d: _npy(d / "s.npy", np.array([[["a"]]])), read_volume,
              "non-numeric values"),
    MediaCase("RGB DICOM slice", lambda d: _dicom_folder(d / "rgb", ["1.2.3.1"], rgb=True),
              read_volume, r"color DICOM \(SamplesPerPixel \[3\], RGB\)"),
    MediaCase("two DICOM series in one folder",
              lambda d: _dicom_folder(d / "two", ["1.2.3.1", "1.2.3.1", "1.2.3.2", "1.2.3.2"]),
              read_volume, r"holds 2 DICOM series \(1\.2\.3\.1: 2 files \(series 1\); 1\.2\.3\.2"),
]  # fmt: skip


@pytest.mark.parametrize("case", MEDIA_CASES, ids=lambda c: c.name)
def test_hostile_media(tmp_path, case):
    path = case.make(tmp_path)
    with pytest.raises(MediaError, match=case.message) as info:
        case.read(path)
    assert str(path) in str(info.value)  # the message names the file


def test_one_series_folder_still_reads(tmp_path):
    volume = read_volume(_dicom_folder(tmp_path / "one", ["1.2.3.1"] * 3))
    assert volume.data.shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("video_fps", 0, "video_fps = 0: must be a positive"),
     ("max_pixels", 10, "min_pixels = 4096: must not exceed max_pixels = 10"),
     ("prune_threshold", float("nan"), "prune_threshold = nan: must be a finite number"),
     ("max_slices", 0, "max_slices = 0: must be a positive integer"),
     ("image_std", (0.5, 0.0, 0.5), "image_std = .*must be positive")],
)  # fmt: skip
def test_processor_settings_are_range_checked(setting, value, message):
    with pytest.raises(ValueError, match=message):
        ProcessorOptions(**{setting: value})


# ---- records -----------------------------------------------------------------------------
def _records(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


GOOD = {
    "id": "ok",
    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
}
GOOD_VIDEO = {
    "id": "v",
    "conversations": [{"from": "human", "value": "<video> hi"}, {"from": "gpt", "value": "yo"}],
}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("latin1.json", "[{\"id\": \"é\"}]".encode("latin-1"), "not UTF-8 text"),
     ("ints.json", b"[1, 2]", "record #0: expected a JSON object, got int"),
     ("empty.json", b"", "invalid JSON"),
     ("empty.jsonl", b"\n\n", "holds no records"),
     ("turns.json", json.dumps([{"id": "t", "conversations": ["hi"]}]).encode(),
      "every turn must be an object"),
     ("broken.jsonl", b'{"id": 1}\n{oops\n', "line 2: invalid JSON"),
     ("start.json", json.dumps([{**GOOD_VIDEO, "videos": [{"path": "a.mp4", "start": "x"}]}]).encode(),
      "start must be seconds >= 0, got 'x'"),
     ("option.json", json.dumps([{**GOOD_VIDEO, "videos": [{"path": "a.mp4", "fps": 3}]}]).encode(),
      r"unknown media options \['fps'\]"),
     ("window.json", json.dumps([{**GOOD_VIDEO, "videos": [{"path": "a.mp4", "ct_window": [40, -1]}]}]).encode(),
      r"ct_window must be a window name or \[level, width > 0\]")],
)  # fmt: skip
def test_hostile_records(tmp_path, name, content, message):
    with pytest.raises(RecordError, match=message):
        load_records(_records(tmp_path, name, content))


def test_record_errors_are_skipped_under_on_error_skip(tmp_path, caplog):
    bad = {"id": "bad", "conversations": []}
    path = _records(tmp_path, "mixed.json", json.dumps([GOOD, bad, 7]).encode())
    with pytest.raises(RecordError, match="'conversations' must be a non-empty list"):
        load_records(path)
    records = load_records(path, on_error="skip")
    assert [r.id for r in records] == ["ok"]
    assert "skipped 2 of 3 records" in caplog.text


# ---- saved models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    model, tok = build_preset("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _edited_copy(src: Path, dst: Path, edit: Callable[[dict], dict]) -> Path:
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(edit(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _nan_connector(state: dict) -> dict:
    state["connector.linear_1.weight"] = torch.full_like(
        state["connector.linear_1.weight"], torch.nan
    )
    return state


MODEL_CASES = [
    ("missing connector", lambda s, d: _edited_copy(s, d, lambda st: {k: v for k, v in st.items()
                                                                     if not k.startswith("connector.")}),
     r"lacks weights: connector\.linear_1\.bias"),
    ("NaN weight", lambda s, d: _edited_copy(s, d, _nan_connector),
     r"non-finite \(NaN/Inf\) values in weights connector\.linear_1\.weight"),
    ("foreign model type", lambda s, d: _foreign(s, d), "model_type is 'bert', not 'omnivmed'"),
    ("truncated weights", lambda s, d: _truncated(s, d), "the saved model cannot be read"),
    ("no config", lambda s, d: d, "config.json missing"),
]  # fmt: skip


def _foreign(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


@pytest.mark.parametrize(("name", "make", "message"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_hostile_model_folders(tmp_path, saved_tiny, name, make, message):
    folder = make(saved_tiny, tmp_path / "m")
    with pytest.raises(ModelLoadError, match=message):
        load_saved_model(folder)


def test_the_intact_folder_loads(saved_tiny):
    assert load_saved_model(saved_tiny).config.model_type == "omnivmed"


# ---- command lines: one line, non-zero exit --------------------------------------------------
def _cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)  # fmt: skip


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    import re

    lines = [line for line in proc.stderr.splitlines() if line.startswith("omnivmed-")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--video-fps", "0"], "video_fps = 0.0: must be a positive"),
     (["--device", "cuda"], "no CUDA device is available"),
     (["--max-slices", "-3"], "max_slices = -3")],
)  # fmt: skip
def test_infer_flags(tmp_path, saved_tiny, flags, message):
    from PIL import Image

    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    proc = _cli("omnivmed.cli.infer", str(saved_tiny), "--image", str(tmp_path / "x.png"),
                "-q", "what?", *flags)  # fmt: skip
    _assert_one_line_error(proc, message)


def test_infer_on_a_broken_model_folder(tmp_path, saved_tiny):
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    folder = _truncated(saved_tiny, tmp_path / "broken")
    proc = _cli("omnivmed.cli.infer", str(folder), "--image", str(tmp_path / "x.png"), "-q", "x")
    _assert_one_line_error(proc, "the saved model cannot be read")


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [("lr: .inf\n", [], "lr must be positive and finite, got inf"),
     ("module_lr: {connector: -1.0}\n", [], r"module_lr\['connector'\] must be positive"),
     ("module_lr: {connector: .nan}\n", [], r"module_lr\['connector'\] must be positive"),
     ("max_grad_norm: -1\n", [], "max_grad_norm must be finite and >= 0, got -1"),
     ("lr: [1\n", [], "not valid YAML"),
     ("media: {video_fps: 0}\n", [], "video_fps = 0: must be a positive"),
     ("max_pixels: 100\n", [], r"unknown keys \['max_pixels'\]"),
     ("", ["--set", "media.max_slices=0"], "max_slices = 0: must be a positive integer"),
     ("", ["--set", "module_lr=5"], "module_lr must be dict"),
     ("", ["--allow-changed", "learning_rate"], r"--allow-changed: unknown settings \['learning_rate'\]")],
)  # fmt: skip
def test_train_config_values_are_checked_before_training(tmp_path, yaml_text, extra, message):
    data = _records(tmp_path, "d.json", json.dumps([GOOD]).encode())
    config = tmp_path / "stage.yaml"
    config.write_text(f"data: {data}\noutput_dir: {tmp_path / 'out'}\n" + yaml_text)
    proc = _cli("omnivmed.cli.train", "--config", str(config), *extra)
    _assert_one_line_error(proc, message)
    assert not (tmp_path / "out").exists()


def test_reading_has_a_time_bound(tmp_path):
    """Between frames, slices and files the readers check `max_read_seconds`."""
    from PIL import Image

    folder = _dicom_folder(tmp_path / "slow", ["1.2.3.1"] * 4)
    with pytest.raises(MediaError, match=r"reading took longer than max_read_seconds = 1e-09 s"):
        read_volume(folder, max_seconds=1e-9)
    assert read_volume(folder, max_seconds=60).data.shape[0] == 4
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(frames / f"{k}.png")
    with pytest.raises(MediaError, match="max_read_seconds"):
        read_video(frames, max_seconds=1e-9)
    with pytest.raises(ValueError, match="max_read_seconds = 0: must be a positive"):
        ProcessorOptions(max_read_seconds=0)
