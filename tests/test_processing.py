"""Readers, intensity, resizing, prompts, records, dataset and collator, on real files that
ship inside PyPI packages and videos made here, plus a corpus of broken files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import omnivmed
from omnivmed.data import InstructionDataset, SampleError, VisualCollator, load_records
from omnivmed.data.records import RecordError
from omnivmed.models import VisualKind
from omnivmed.processing import pack_visual_items
from omnivmed.processing.errors import MediaError
from omnivmed.processing.intensity import normalize_percentile, to_encoder_input, window_ct
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions
from omnivmed.processing.prompt import ConversationError, expand_markers, to_messages
from omnivmed.processing.readers import read_image, read_video, read_volume, video_frame_indices
from omnivmed.processing.resize import snap_size, uniform_indices

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")


def mni_template() -> Path:
    import nilearn.datasets

    return (
        Path(nilearn.datasets.__file__).parent
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )


def ct_slice() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """Real images saved in several formats, a DICOM series and an mp4."""
    from PIL import Image
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("media")
    Image.fromarray(skdata.retina()).resize((256, 256)).save(root / "fundus.png")
    Image.fromarray(skdata.immunohistochemistry()).save(root / "pathology.jpg", quality=90)
    ct = pydicom.dcmread(ct_slice()).pixel_array.astype(np.uint16)
    Image.fromarray(ct).save(root / "ct16.png")
    Image.fromarray((ct >> 4).astype(np.uint8)).save(root / "ct8.tif")
    # A DICOM series: five slices written out of order, positions 5 mm apart.
    series = root / "series"
    series.mkdir()
    for i, z in enumerate([3, 0, 4, 1, 2]):
        ds = pydicom.dcmread(ct_slice())
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * z]
        ds.InstanceNumber = 10 - i  # deliberately unrelated to the position
        arr = ds.pixel_array.copy()
        arr[:4, :4] = z  # tag each slice with its position in the corner
        ds.PixelData = arr.tobytes()
        ds.save_as(series / f"slice{i}.dcm")
    # A 3 s endoscopy-like clip at 10 fps: frame k is uniformly k * 8 gray.
    import av

    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(30):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), k * 8, np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames = root / "frames"
    frames.mkdir()
    for k in range(4):
        Image.fromarray(np.full((32, 40, 3), 60 * k, np.uint8)).save(frames / f"{k:03d}.png")
    return root


# ---- readers ------------------------------------------------------------------------------
def test_images_of_every_kind(media_dir):
    fundus = read_image(media_dir / "fundus.png")
    assert fundus.shape == (256, 256, 3) and fundus.min() >= 0 and fundus.max() <= 1
    assert read_image(media_dir / "pathology.jpg").shape[2] == 3
    ct16 = read_image(media_dir / "ct16.png")  # 16-bit grayscale
    assert ct16.shape == (128, 128, 1) and ct16.max() <= 1 and len(np.unique(ct16)) > 256
    assert read_image(media_dir / "ct8.tif").shape == (128, 128, 1)


def test_nifti_template_is_read_canonically():
    volume = read_volume(mni_template())
    assert volume.data.shape == (189, 233, 197)  # axial slices of the 197x233x189 template
    assert volume.data.dtype == np.float32 and np.isfinite(volume.data).all()
    assert volume.spacing == (1.0, 1.0, 1.0)


def test_nibabel_test_volume_and_4d_rejection():
    data_dir = Path(nib.__file__).parent / "tests" / "data"
    assert read_volume(data_dir / "anatomical.nii").data.ndim == 3
    with pytest.raises(MediaError, match="expected a 3-D volume"):
        read_volume(data_dir / "example4d.nii.gz")


def test_dicom_series_sorted_by_position_in_hounsfield_units(media_dir):
    volume = read_volume(media_dir / "series")
    assert volume.modality == "CT" and volume.data.shape == (5, 128, 128)
    ds = pydicom.dcmread(ct_slice())
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    corner = volume.data[:, 0, 0]
    np.testing.assert_allclose(corner, np.arange(5) * slope + intercept)  # sorted by position
    single = read_volume(ct_slice())
    np.testing.assert_allclose(single.data[0], ds.pixel_array * slope + intercept)


def test_numpy_volumes(tmp_path):
    arr = np.random.rand(6, 20, 24).astype(np.float32)
    np.save(tmp_path / "v.npy", arr)
    np.savez(tmp_path / "v.npz", volume=arr)
    np.testing.assert_array_equal(read_volume(tmp_path / "v.npy").data, arr)
    np.testing.assert_array_equal(read_volume(tmp_path / "v.npz").data, arr)


def test_video_sampling(media_dir):
    clip = media_dir / "clip.mp4"
    by_fps = read_video(clip, sample_fps=2.0)
    assert by_fps.frames.shape == (6, 48, 64, 3)
    np.testing.assert_allclose(by_fps.timestamps, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    gray = by_fps.frames.mean(axis=(1, 2, 3)) * 255
    np.testing.assert_allclose(gray, np.arange(0, 30, 5) * 8, atol=6)  # the right frames
    assert read_video(clip, num_frames=4).frames.shape[0] == 4
    window = read_video(clip, sample_fps=10, start=1.0, end=2.0)
    assert window.timestamps[0] == pytest.approx(1.0) and window.timestamps[-1] == pytest.approx(
        2.0
    )
    capped = read_video(clip, max_frames=7)  # thinned evenly, never cut short
    assert len(capped.timestamps) == 7 and capped.timestamps[-1] == pytest.approx(2.9)
    frames = read_video(media_dir / "frames")
    assert frames.frames.shape == (4, 32, 40, 3)


def test_frame_index_rules():
    assert video_frame_indices(100, 10.0, num_frames=3) == [0, 50, 99]
    with pytest.raises(ValueError, match="not both"):
        video_frame_indices(100, 10.0, num_frames=3, sample_fps=1)
    with pytest.raises(ValueError, match="empty time range"):
        video_frame_indices(100, 10.0, start=5.0, end=4.0)


# ---- broken files ---------------------------------------------------------------------------
@pytest.fixture
def broken(tmp_path, media_dir) -> dict[str, Path]:
    files = {}
    nii = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.random.rand(8, 9, 10).astype(np.float32), np.eye(4)), nii)
    raw = nii.read_bytes()
    files["truncated nifti"] = tmp_path / "truncated.nii"
    files["truncated nifti"].write_bytes(raw[: len(raw) // 2])
    huge = bytearray(raw)
    huge[42:48] = np.array([30000, 30000, 30000], dtype="<i2").tobytes()  # dim[1..3]
    files["huge declared dims"] = tmp_path / "huge.nii"
    files["huge declared dims"].write_bytes(bytes(huge))
    files["wrong magic nifti"] = tmp_path / "garbage.nii.gz"
    files["wrong magic nifti"].write_bytes(os.urandom(500))
    for name in ("empty.png", "empty.mp4", "empty.dcm", "empty.nii"):
        files[f"zero-size {name}"] = tmp_path / name
        files[f"zero-size {name}"].write_bytes(b"")
    files["corrupt png"] = tmp_path / "corrupt.png"
    files["corrupt png"].write_bytes((media_dir / "fundus.png").read_bytes()[:200])
    files["corrupt mp4"] = tmp_path / "corrupt.mp4"
    files["corrupt mp4"].write_bytes(os.urandom(2000))
    files["truncated dicom"] = tmp_path / "truncated.dcm"
    files["truncated dicom"].write_bytes(ct_slice().read_bytes()[:3000])
    nan = np.random.rand(4, 5, 6).astype(np.float32)
    nan[1, 2, 3] = np.nan
    files["nan voxels"] = tmp_path / "nan.npy"
    np.save(files["nan voxels"], nan)
    return files


READERS = {".png": read_image, ".mp4": read_video}


@pytest.mark.parametrize(
    "name",
    ["truncated nifti", "huge declared dims", "wrong magic nifti", "zero-size empty.png",
     "zero-size empty.mp4", "zero-size empty.dcm", "zero-size empty.nii", "corrupt png",
     "corrupt mp4", "truncated dicom", "nan voxels"],
)  # fmt: skip
def test_every_broken_file_gets_a_clear_error(broken, name):
    path = broken[name]
    reader = READERS.get(path.suffix, read_volume)
    with pytest.raises(MediaError) as info:
        reader(path)
    assert str(path) in str(info.value)
    if name == "huge declared dims":
        assert "over the limit" in str(info.value)
    if name == "nan voxels":
        assert "NaN" in str(info.value)


def test_missing_file():
    with pytest.raises(MediaError, match="file not found"):
        read_volume("/nonexistent/ct.nii.gz")


# ---- intensity and sizes ---------------------------------------------------------------------
def test_ct_windows_and_percentiles():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window_ct(hu, "mediastinum"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(window_ct(hu, (0.0, 2000.0)), [0, 0.42, 0.52, 0.62, 1], atol=1e-6)
    with pytest.raises(ValueError, match="known windows: abdomen, bone, brain, lung, mediastinum"):
        window_ct(hu, "liver")
    x = np.random.rand(1000) * 100
    y = normalize_percentile(x)
    assert y.min() == 0 and y.max() == 1
    enc = to_encoder_input(np.ones((2, 8, 8)))
    assert enc.shape == (2, 3, 8, 8) and torch.allclose(enc, torch.ones(1))


def test_snap_size_and_budgets():
    assert snap_size(250, 380, 16, 64 * 64, 448 * 448) == (256, 384)
    h, w = snap_size(2000, 1000, 14, 56 * 56, 448 * 448)
    assert h % 14 == 0 and w % 14 == 0 and h * w <= 448 * 448 and abs(h / w - 2) < 0.1
    h, w = snap_size(20, 20, 16, 64 * 64, 448 * 448)
    assert h * w >= 64 * 64
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(3, 8) == [0, 1, 2]


# ---- prompts -------------------------------------------------------------------------------
def test_markers_expand_to_exact_counts_and_mismatch_errors():
    msgs = to_messages(
        [{"from": "human", "value": "<image3d> and <video>?"}, {"from": "gpt", "value": "x"}]
    )
    out = expand_markers(msgs, [2, 3], "<P>")
    assert out[0]["content"] == "<P><P> and <P><P><P>?"
    with pytest.raises(
        ConversationError, match="2 visual markers but the sample has 1 visual items"
    ):
        expand_markers(msgs, [2], "<P>")
    with pytest.raises(ConversationError, match="empty"):
        to_messages([], "s1")
    with pytest.raises(ConversationError, match="no answer"):
        to_messages([{"from": "human", "value": "hi"}], "s1")


# ---- processor, records, dataset, collator ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return omnivmed.build_preset("tiny")


@pytest.fixture(scope="module")
def data_root(media_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    shutil.copy(mni_template(), root / "mni.nii.gz")
    for name in ("fundus.png", "clip.mp4"):
        shutil.copy(media_dir / name, root / name)
    shutil.copytree(media_dir / "series", root / "series")
    records = [
        {"id": "mri", "volumes": ["mni.nii.gz"],
         "conversations": [{"from": "human", "value": "<image3d>\nWhich sequence?"}, {"from": "gpt", "value": "T1."}]},
        {"id": "mixed", "image": "fundus.png", "videos": ["clip.mp4"], "volumes": [{"path": "series", "ct_window": "lung"}],
         "conversations": [{"from": "human", "value": "<image> <video> <image3d> compare"}, {"from": "gpt", "value": "ok"}]},
        {"id": "broken", "images": ["missing.png"],
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    return root


def test_processor_gives_exact_placeholder_counts_and_runs_the_model(tiny, data_root):
    model, tok = tiny
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(max_pixels=64 * 64, max_slices=12))
    media = [Media(VisualKind.IMAGE, data_root / "fundus.png"), Media(VisualKind.VIDEO, data_root / "clip.mp4"),
             Media(VisualKind.VOLUME, data_root / "mni.nii.gz")]  # fmt: skip
    conv = [
        {"from": "human", "value": "<image><video><image3d> describe"},
        {"from": "gpt", "value": "fine"},
    ]
    sample = proc(conv, media, "s1")
    visual = sample["visual"]
    placeholders = int((sample["input_ids"] == model.config.image_token_id).sum())
    assert placeholders == sum(visual.token_counts) == visual.pixel_values.shape[0]
    assert visual.token_counts[2] < visual.unpruned_counts[2]  # empty background slices are pruned
    out = model(
        input_ids=sample["input_ids"][None], labels=sample["labels"][None], **visual.model_inputs()
    )
    assert torch.isfinite(out.loss)
    unpruned = proc(conv, media, "s1", prune=False)["visual"]
    assert unpruned.token_counts == unpruned.unpruned_counts


def test_token_cap_subsamples_whole_frames(tiny, data_root):
    model, tok = tiny
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(max_pixels=64 * 64, max_slices=64,
                                                                  max_visual_tokens=200, prune=False))  # fmt: skip
    sample = proc([{"from": "human", "value": "<image3d>"}, {"from": "gpt", "value": "x"}],
                  [Media(VisualKind.VOLUME, data_root / "mni.nii.gz")], "cap")  # fmt: skip
    frames, gh, gw = sample["visual"].visual_grids[0].tolist()
    assert (
        sum(sample["visual"].token_counts) <= 200
        and frames * gh * gw == sample["visual"].token_counts[0]
    )


def test_records_dataset_and_collator(tiny, data_root):
    model, tok = tiny
    records = load_records(data_root / "train.json")
    assert [r.id for r in records] == ["mri", "mixed", "broken"]
    assert [k for k, _, _ in records[1].media] == [
        VisualKind.IMAGE,
        VisualKind.VIDEO,
        VisualKind.VOLUME,
    ]
    assert records[1].media[2][2] == {"ct_window": "lung"}
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(max_pixels=64 * 64, max_slices=8))
    strict = InstructionDataset(records, proc)
    with pytest.raises(SampleError, match=r"sample 'broken'.*missing\.png.*file not found") as err:
        strict[2]
    assert str(err.value).count("sample 'broken'") == 1  # named once, with its index
    lenient = InstructionDataset(records, proc, on_error="skip")
    samples = [lenient[i] for i in range(3)]
    assert samples[2] is None
    for packing in (True, False):
        batch = VisualCollator(tok.pad_token_id, packing=packing)(samples)
        assert batch["num_skipped"] == 1 and batch["ids"] == ["mri", "mixed"]
        assert (
            int((batch["input_ids"] == model.config.image_token_id).sum())
            == batch["pixel_values"].shape[0]
        )
        assert batch["visual_cu_seqlens"].numel() == 5  # four items
        if packing:
            assert batch["input_ids"].shape[0] == 1 and batch["position_ids"][0, 0] == 0
        else:
            out = model(**{k: v for k, v in batch.items() if k not in ("num_skipped", "ids")})
            assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "record,message",
    [
        ({"id": "a", "images": ["../outside.png"], "conversations": [{"from": "human", "value": "<image>"}]}, "outside the data root"),
        ({"id": "b", "images": ["x.png", "y.png"], "conversations": [{"from": "human", "value": "<image>"}]}, "1 visual markers but the record lists 2"),
        ({"id": "c", "conversations": []}, "non-empty list"),
    ],
)  # fmt: skip
def test_bad_records(tmp_path, record, message):
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordError, match=message):
        load_records(tmp_path / "d.jsonl")


def test_pack_visual_items_counts_match_connector(tiny):
    model, _ = tiny
    from omnivmed.processing import VisualItem

    batch = pack_visual_items(
        [VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 24))], model.config
    )
    assert batch.token_counts == [6]


def test_mixture_ratios_are_deterministic(tiny, data_root, tmp_path):
    from omnivmed.data import MixtureError, load_mixture

    model, tok = tiny
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(max_pixels=64 * 64, max_slices=4))
    (data_root / "one.json").write_text(
        json.dumps([json.loads((data_root / "train.json").read_text())[0]])
    )
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        f"seed: 3\nnum_samples: 10\ndatasets:\n"
        f"  - {{path: {data_root / 'train.json'}, ratio: 0.7}}\n"
        f"  - {{path: {data_root / 'one.json'}, ratio: 0.3}}\n"
    )
    a, b = load_mixture(spec, proc, on_error="skip"), load_mixture(spec, proc, on_error="skip")
    assert len(a) == 10 and a.counts == [7, 3] and a.index == b.index
    assert sum(1 for d, _ in a.index if d == 1) == 3
    spec.write_text("datasets:\n  - {path: x.json, weight: 1}\n")
    with pytest.raises(MixtureError, match="needs 'path' and only"):
        load_mixture(spec, proc)
    spec.write_text("sets: []\n")
    with pytest.raises(MixtureError, match="unknown keys"):
        load_mixture(spec, proc)


def test_dataloader_workers(tiny, data_root):
    from torch.utils.data import DataLoader

    model, tok = tiny
    proc = OmniVMedProcessor(model.config, tok, ProcessorOptions(max_pixels=64 * 64, max_slices=4))
    dataset = InstructionDataset(load_records(data_root / "train.json"), proc, on_error="skip")
    loader = DataLoader(
        dataset, batch_size=3, num_workers=2, collate_fn=VisualCollator(tok.pad_token_id)
    )
    (batch,) = list(loader)
    assert batch["num_skipped"] == 1 and batch["ids"] == ["mri", "mixed"]


def test_regressions_from_review(tmp_path):
    # fps sampling never rounds past the last frame (60 frames at 29.97 fps, 1 fps)
    assert max(video_frame_indices(60, 29.97, sample_fps=1.0)) <= 59
    assert max(video_frame_indices(100, 10.0, sample_fps=3.0, end=4.0)) <= 40
    # snap_size keeps its area bounds, even when rounding or thin images push past them
    for args in (
        (100, 300, 16, 50176, 50176),
        (20000, 10, 16, 4096, 200704),
        (48, 64, 8, 4096, 4096),
    ):
        h, w = snap_size(*args)
        assert h % args[2] == 0 and w % args[2] == 0 and args[3] <= h * w <= args[4], (args, h, w)
    # NIfTI slices use the radiological view, like DICOM: the patient's right (+x in RAS) on the left
    data = np.zeros((5, 4, 3), np.float32)
    data[4, :, :] = 1.0  # the rightmost x column
    data[:, 3, :] += 2.0  # the most anterior y row
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ras.nii")
    sl = read_volume(tmp_path / "ras.nii").data[0]
    assert sl[1:, 0].tolist() == [1.0] * 3 and sl[0, 1:].tolist() == [2.0] * 4
    # a multi-frame DICOM file gives one slice per frame
    ds = pydicom.dcmread(ct_slice())
    frames = np.stack([ds.pixel_array] * 3)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "mf.dcm")
    assert read_volume(tmp_path / "mf.dcm").data.shape == (3, 128, 128)


def test_frame_scope_with_an_empty_last_item():
    from omnivmed.models.attention import frame_cu_seqlens
    from omnivmed_ext import frame_positions as fp

    pos = fp(1, 2, 2)
    cu = torch.tensor([0, 4, 4], dtype=torch.int32)
    assert frame_cu_seqlens(pos, cu).tolist() == [0, 4]


def test_merge_connector_needs_whole_blocks(tiny):
    from omnivmed.models import OmniVMedConfig

    with pytest.raises(ValueError, match="prune_unit must be a multiple of 2"):
        OmniVMedConfig(connector="merge_mlp", prune_unit=1)


def test_packed_batch_keeps_samples_apart(tiny):
    from omnivmed.processing import VisualItem

    model, tok = tiny
    model.eval()
    items = [
        VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 16, 16)),
        VisualItem(VisualKind.IMAGE, torch.randn(1, 3, 24, 16)),
    ]
    samples = []
    for i, item in enumerate(items):
        visual = pack_visual_items([item], model.config)
        msgs = expand_markers(to_messages([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": f"a{i}"}]),
                              visual.token_counts, model.config.image_token)  # fmt: skip
        from omnivmed.processing.prompt import tokenize_conversation

        ids, labels = tokenize_conversation(tok, msgs, model.config.image_token)
        samples.append({"id": str(i), "input_ids": ids, "labels": labels, "visual": visual})
    batch = VisualCollator(tok.pad_token_id, packing=True)(samples)
    batch = {k: v for k, v in batch.items() if k not in ("ids", "num_skipped", "labels")}
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        n0 = samples[0]["input_ids"].numel()
        alone = model(
            input_ids=samples[1]["input_ids"][None], **samples[1]["visual"].model_inputs()
        ).logits[0]
    torch.testing.assert_close(packed[n0:], alone, rtol=1e-4, atol=1e-4)
