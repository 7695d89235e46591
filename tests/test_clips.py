"""omnivmed-data clips: clips of consecutive frames around annotated frames, inside their
sequence, as frame folders or mp4; readable as videos; resumable."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnivmed.cli.data import main
from omnivmed.data.records import load_records
from omnivmed.prep.clips import ClipError, ClipSettings, clip_positions, cut_clips
from omnivmed.prep.converters import convert_dataset
from omnivmed.processing.readers import read_video


@pytest.mark.parametrize("window", [1, 2, 5, 8])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 7, 20])
def test_clip_positions_stay_inside_and_keep_the_annotated_frame(window, stride, length):
    settings = ClipSettings(window=window, stride=stride)
    for center in range(length):
        positions = clip_positions(center, length, settings)
        if settings.span > length:
            assert positions is None
            continue
        assert positions is not None and center in positions
        assert len(positions) == window and positions[0] >= 0 and positions[-1] < length
        assert all(b - a == stride for a, b in itertools.pairwise(positions))
        middle = (window - 1) // 2
        inside = (
            center - middle * stride >= 0 and center - middle * stride + settings.span <= length
        )
        if inside:  # away from the ends the annotated frame is in the middle
            assert positions.index(center) == middle
        skip = clip_positions(
            center, length, ClipSettings(window=window, stride=stride, edge="skip")
        )
        assert (skip == positions) if inside else skip is None


def test_bad_settings_are_refused():
    for kwargs, message in (({"window": 0}, "window"), ({"stride": 0}, "stride"),
                            ({"edge": "pad"}, "edge"), ({"format": "gif"}, "format"),
                            ({"fps": 0}, "fps")):  # fmt: skip
        with pytest.raises(ClipError, match=message):
            ClipSettings(**kwargs)


def endovis_tree(root: Path, frames_per_sequence: dict[int, int]) -> Path:
    """Frames numbered frame000..; questions on every other frame of each sequence."""
    for seq in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16):
        n = frames_per_sequence.get(seq, 1)
        qa = root / f"seq_{seq}" / "vqa" / "Classification"
        qa.mkdir(parents=True)
        for f in range(n):
            frame = root / f"seq_{seq}" / "left_frames" / f"frame{f:03d}.png"
            frame.parent.mkdir(parents=True, exist_ok=True)
            # Each frame's pixels encode (sequence, frame) so clips can be checked by content.
            Image.fromarray(np.full((48, 64, 3), (seq * 10, f * 5, 0), np.uint8)).save(frame)
            if f % 2 == 0:
                (qa / f"frame{f:03d}_QA.txt").write_text(
                    "What organ is being operated?|kidney\nWhere is clasper located?|left-top\n"
                )
    return root


def test_frame_clips_around_annotated_frames(tmp_path, capsys):
    root = endovis_tree(tmp_path / "endovis", {1: 12, 2: 11, 3: 3})
    convert_dataset("endovis18-vqa", root, tmp_path / "e.jsonl")
    out = tmp_path / "clips"
    argv = ["clips", str(tmp_path / "e.jsonl"), "--data-root", str(root), "--out", str(out),
            "--window", "4", "--stride", "2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "clips.summary.json").read_text())
    # seq 1: 6 annotated frames, seq 2: 6; seq 3 (3 frames) and the one-frame sequences are
    # shorter than a clip's span of 7 frames.
    assert summary["clips_per_sequence"] == {"seq_1/left_frames": 6, "seq_2/left_frames": 6}
    assert summary["skipped"]["sequence_too_short"] == summary["annotated_frames"] - 12
    assert "left out" in capsys.readouterr().out
    clips = [json.loads(x) for x in (out / "clips.jsonl").read_text().splitlines()]
    first = next(c for c in clips if c["annotated_frame"] == "seq_1/left_frames/frame000.png")
    # At the start of the sequence the window moves inside it: frame 0 is the first slot.
    assert first["frames"] == [f"seq_1/left_frames/frame{i:03d}.png" for i in (0, 2, 4, 6)]
    assert first["clip_center"] == 0
    middle = next(c for c in clips if c["annotated_frame"] == "seq_1/left_frames/frame006.png")
    assert middle["frames"][middle["clip_center"]] == middle["annotated_frame"]
    assert middle["clip_center"] == 1  # (window - 1) // 2
    for clip in clips:  # never across sequences
        assert {Path(f).parent.as_posix() for f in clip["frames"]} == {clip["sequence"]}
    # The clip folder reads as a video whose frames are the listed source frames.
    video = read_video(out / middle["video"], max_frames=None)
    expected = [int(Path(f).stem[5:]) * 5 for f in middle["frames"]]
    assert [round(float(v[0, 0, 1]) * 255) for v in video.frames] == expected
    # Clip records: the same questions asked of the clip; they load for training.
    records = load_records(out / "clip_records.jsonl", out)
    assert len(records) == 2 * len(clips)
    assert records[0].conversations[0]["value"].startswith("<video>\n")
    by_id = {r.id: r for r in records}
    rec = by_id[f"{first['records'][0]}-clip"]
    assert rec.media[0][1] == (out / first["video"]).resolve()
    assert rec.meta["clip_center"] == 0 and rec.meta["split"] == "validation"


def test_skip_edge_mp4_and_resume(tmp_path):
    pytest.importorskip("av")
    root = endovis_tree(tmp_path / "endovis", {1: 9})
    convert_dataset("endovis18-vqa", root, tmp_path / "e.jsonl")
    out = tmp_path / "clips"
    settings = ClipSettings(window=3, stride=1, edge="skip", format="mp4", fps=2.0)
    summary = cut_clips(tmp_path / "e.jsonl", root, out, settings)
    # Annotated frames 0, 2, 4, 6, 8 of seq 1: 0 and 8 sit at the ends.
    assert summary["clips"] == 3 and summary["skipped"]["too_close_to_an_end"] == 2
    clips = [json.loads(x) for x in (out / "clips.jsonl").read_text().splitlines()]
    video = read_video(out / clips[0]["video"], max_frames=None)
    assert video.frames.shape == (3, 48, 64, 3)
    assert abs(video.timestamps[1] - 0.5) < 1e-6
    greens = [float(v[..., 1].mean()) * 255 for v in video.frames]
    assert np.allclose(greens, [5, 10, 15], atol=3)  # frames 1, 2, 3 in order
    # A rerun keeps the finished clips; one a crash left half-written is redone.
    half = out / "clips" / Path(clips[1]["video"]).name
    half.rename(half.with_name(half.stem + ".tmp.mp4"))
    half.with_name(half.stem + ".tmp.mp4").write_bytes(b"partial")
    again = cut_clips(tmp_path / "e.jsonl", root, out, settings)
    assert again["clips_reused"] == 2 and again["sha256"] == summary["sha256"]
    redone = read_video(half, max_frames=None).frames
    assert np.allclose([float(v[..., 1].mean()) * 255 for v in redone], [15, 20, 25], atol=3)
    # Other settings into the same folder would mix clips of two kinds: refused.
    with pytest.raises(ClipError, match=r"other settings \(window\)"):
        cut_clips(
            tmp_path / "e.jsonl",
            root,
            out,
            ClipSettings(window=5, edge="skip", format="mp4", fps=2.0),
        )
    with pytest.raises(ClipError, match="fps must be in"):
        ClipSettings(fps=float("inf"))


def test_records_that_are_not_single_frames_are_refused(tmp_path):
    (tmp_path / "v.png").write_bytes(b"")
    rows = [{"id": "x", "images": ["v.png", "v.png"],
             "conversations": [{"from": "human", "value": "<image><image>\nQ"}]}]  # fmt: skip
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ClipError, match="sample 'x' has 2 media"):
        cut_clips(tmp_path / "r.jsonl", tmp_path, tmp_path / "o", ClipSettings())


def test_clips_from_recorded_videos(tmp_path, capsys):
    """Cholec80-style: frames named by their frame number in a 25 fps video; with the
    videos present the clip's frames are decoded from them at the video's own spacing."""
    av = pytest.importorskip("av")
    pytest.importorskip("decord")
    root = tmp_path / "c80"
    (root / "videos").mkdir(parents=True)
    with av.open(str(root / "videos" / "video01.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(220):  # frame i is grey level i, so decoded clips show their positions
            pixels = np.full((48, 64, 3), i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    rows = [{"id": f"q{f}", "images": [f"cropped_image/{v}/{f}.png"], "split": "train",
             "conversations": [{"from": "human", "value": "<image>\nWhat is the phase of image?"},
                               {"from": "gpt", "value": "preparation"}]}
            for v, f in ((1, 0), (1, 100), (1, 200), (2, 100))]  # fmt: skip
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["clips", str(data), "--data-root", str(root), "--out", str(tmp_path / "out"),
            "--window", "5", "--stride", "10", "--source-video", "videos/video{sequence:0>2}.mp4"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "clips.summary.json").read_text())
    assert summary["clips"] == 3 and summary["skipped"]["video_missing"] == 1  # no video02.mp4
    clips = {c["annotated_frame"]: c for c in map(json.loads, (tmp_path / "out/clips.jsonl").read_text().splitlines())}  # fmt: skip
    mid = clips["cropped_image/1/100.png"]
    assert mid["frames"] == [f"videos/video01.mp4#{i}" for i in (80, 90, 100, 110, 120)]
    assert mid["clip_center"] == 2
    # Near the video's end the window moves inside it: frame 200 of 220 takes slot 3.
    end = clips["cropped_image/1/200.png"]
    assert end["frames"][-1] == "videos/video01.mp4#210" and end["clip_center"] == 3
    assert clips["cropped_image/1/0.png"]["clip_center"] == 0
    video = read_video(tmp_path / "out" / mid["video"], max_frames=None)
    assert np.allclose(video.frames.mean(axis=(1, 2, 3)) * 255, [80, 90, 100, 110, 120], atol=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "images": ["cropped_image/1/last.png"]}) + "\n"
                   + json.dumps({**rows[1], "images": ["cropped_image/1/900.png"]}) + "\n")  # fmt: skip
    assert main(["clips", str(bad), "--data-root", str(root), "--out", str(tmp_path / "o2"),
                 "--source-video", "videos/video{sequence:0>2}.mp4"]) == 0  # fmt: skip
    left_out = json.loads((tmp_path / "o2" / "clips.summary.json").read_text())["skipped"]
    assert left_out["frame_not_numbered"] == 1 and left_out["frame_beyond_video"] == 1


def one_frame_record(sample_id: str, frame: str, split: str = "train") -> dict:
    return {"id": sample_id, "images": [frame], "split": split,
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}  # fmt: skip


def frames(folder: Path, count: int, size: tuple[int, int] = (48, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(count):
        Image.fromarray(np.full((*size, 3), f * 10, np.uint8)).save(folder / f"f{f}.png")


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_clips_never_mix_splits_or_ids_and_copy_frames(tmp_path):
    root = tmp_path / "rel"
    frames(root / "a b", 6)
    frames(root / "a-b", 6)
    data = write_records(tmp_path / "r.jsonl", [
        one_frame_record("x", "a b/f2.png"), one_frame_record("y", "a-b/f2.png"),
        one_frame_record("t", "a-b/f4.png", split="test"),
    ])  # fmt: skip
    summary = cut_clips(data, root, tmp_path / "out", ClipSettings(window=3))
    # a-b/f2's clip (f1-f3) holds no test frame; a-b/f4's (f3-f5) holds none of train's.
    assert summary["clips"] == 3 and summary["skipped"]["frames_of_another_split"] == 0
    clips = [json.loads(x) for x in (tmp_path / "out/clips.jsonl").read_text().splitlines()]
    assert len({c["id"] for c in clips}) == 3  # "a b" and "a-b" read alike but differ
    assert {c["sequence"] for c in clips} == {"a b", "a-b"}
    data = write_records(tmp_path / "r2.jsonl", [
        one_frame_record("x", "a-b/f2.png"), one_frame_record("t", "a-b/f3.png", split="test")])  # fmt: skip
    summary = cut_clips(data, root, tmp_path / "out2", ClipSettings(window=3))
    assert summary["clips"] == 0 and summary["skipped"]["frames_of_another_split"] == 2
    # Frames are copied unless --link: editing a clip's frame leaves the release as it was.
    clip_frame = sorted((tmp_path / "out" / clips[0]["video"]).iterdir())[0]
    assert clip_frame.stat().st_nlink == 1
    linked = cut_clips(
        tmp_path / "r.jsonl", root, tmp_path / "out3", ClipSettings(window=3, link_frames=True)
    )
    assert linked["clips"] == 3
    first = json.loads((tmp_path / "out3/clips.jsonl").read_text().splitlines()[0])
    assert sorted((tmp_path / "out3" / first["video"]).iterdir())[0].stat().st_nlink == 2


def test_a_linked_frame_stays_in_its_own_sequence(tmp_path):
    root = tmp_path / "rel"
    frames(root / "pool", 8)
    (root / "seq_1").mkdir()
    for f in range(3):
        (root / "seq_1" / f"f{f}.png").symlink_to(root / "pool" / f"f{f + 4}.png")
    data = write_records(tmp_path / "r.jsonl", [one_frame_record("x", "seq_1/f1.png")])
    cut_clips(data, root, tmp_path / "out", ClipSettings(window=3))
    clip = json.loads((tmp_path / "out/clips.jsonl").read_text())
    assert clip["sequence"] == "seq_1" and clip["frames"] == [f"seq_1/f{f}.png" for f in range(3)]


def test_mp4_refuses_frames_too_small_for_h264(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "rel"
    frames(root / "s", 3, size=(1, 8))
    data = write_records(tmp_path / "r.jsonl", [one_frame_record("x", "s/f1.png")])
    with pytest.raises(ClipError, match="1x8 pixels are too small"):
        cut_clips(data, root, tmp_path / "out", ClipSettings(window=3, format="mp4"))
