"""Surgical clips around annotated frames (OmniV-Med Fig. 2's video segments).

Frame-level surgical VQA (EndoVis18-VQA, Cholec80-VQA, PSI-AVA-VQA) annotates single
frames of a recorded procedure. `cut_clips` turns each annotated frame of a converted file
into a short clip of consecutive frames around it, taken from the frames the release ships
beside it:

- a sequence is the folder that holds the annotated frame, its frames in natural name
  order (frame9 before frame10); a clip never takes frames from another folder;
- a clip is `window` frames, `stride` frames apart, with the annotated frame as close to
  its middle as the sequence allows: near a sequence's start or end the window moves
  inside the sequence (`edge="shift"`, the annotated frame stays on the clip's grid) or
  the frame is left out (`edge="skip"`); a sequence shorter than the clip's span is
  always left out, and counted;
- or, where the release's frames are numbers of frames of recorded videos (Cholec80) and
  the videos are there, the sequence is the video (`source_video`, a path template with
  `{sequence}` for the frame folder's name) and the clip's frames are decoded from it;
- clips are written as frame folders (hard links to the release's frames where the
  filesystem allows, else copies; PNGs of decoded video frames) or as mp4 files (PyAV, H.264) at `fps`.

Outputs in the output folder, which is the data root of everything in it:
`clips.jsonl` (one line per clip: id, video, the source frames, the annotated frame's
position; what `omnivmed-data captions` reads), `clip_records.jsonl` (each input record
asked of its clip: `videos` instead of `images`, `<video>` instead of `<image>`, the
annotated frame's position in `clip_center`), and `clips.summary.json`. A rerun keeps
finished clips: each clip is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .records import load_records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EDGES = ("shift", "skip")
FORMATS = ("frames", "mp4")


class ClipError(ValueError):
    """Settings or inputs that cannot give clips (names what is wrong)."""


@dataclass(frozen=True)
class ClipSettings:
    window: int = 8  # frames per clip
    stride: int = 1  # source frames between two clip frames
    edge: str = "shift"  # near a sequence's ends: "shift" the window inside, or "skip"
    format: str = "frames"  # "frames" (a folder per clip) or "mp4"
    fps: float = 1.0  # mp4 frame rate: the source's frame rate divided by the stride

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ClipError(f"window must be at least 1 frame, got {self.window}")
        if self.stride < 1:
            raise ClipError(f"stride must be at least 1 frame, got {self.stride}")
        if self.edge not in EDGES:
            raise ClipError(f"edge must be one of {EDGES}, got {self.edge!r}")
        if self.format not in FORMATS:
            raise ClipError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not self.fps > 0:
            raise ClipError(f"fps must be > 0, got {self.fps}")

    @property
    def span(self) -> int:
        """Source frames a clip covers, first to last."""
        return (self.window - 1) * self.stride + 1


def clip_positions(center: int, length: int, settings: ClipSettings) -> list[int] | None:
    """Indices (into a sequence of `length` frames) of the clip around frame `center`, or
    None when the sequence cannot hold it. The centre frame is always one of them."""
    if not 0 <= center < length:
        raise ClipError(f"frame {center} is outside a sequence of {length} frames")
    if settings.span > length:
        return None
    middle = (settings.window - 1) // 2
    # Slots the centre frame may take (0 = first clip frame); the nearest to the middle
    # that keeps the whole clip inside the sequence wins.
    slots = [middle] if settings.edge == "skip" else sorted(
        range(settings.window), key=lambda s: (abs(s - middle), s)
    )  # fmt: skip
    for slot in slots:
        first = center - slot * settings.stride
        if first >= 0 and first + settings.span <= length:
            return list(range(first, first + settings.span, settings.stride))
    return None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sequence_frames(folder: Path) -> list[Path]:
    """The frame images of one sequence folder, in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _clip_id(frame: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(Path(frame).with_suffix("")).replace(os.sep, "__"))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def _write_folder(frames: Sequence[Path | np.ndarray], folder: Path) -> None:
    """Source frame files are linked; decoded frames (uint8 RGB) are written as PNG."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(3, len(str(len(frames))))
    for i, frame in enumerate(frames):
        if isinstance(frame, Path):
            _link_or_copy(frame, tmp / f"{i:0{width}d}{frame.suffix.lower()}")
        else:
            Image.fromarray(frame).save(tmp / f"{i:0{width}d}.png")
    tmp.rename(folder)


def _as_rgb8(frame: Path | np.ndarray) -> np.ndarray:
    if not isinstance(frame, Path):
        return frame
    from ..processing.readers import read_image

    pixels = read_image(frame)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return (pixels * 255.0).round().clip(0, 255).astype(np.uint8)


def _write_mp4(frames: Sequence[Path | np.ndarray], path: Path, fps: float) -> None:
    try:
        import av
    except ImportError as exc:
        raise ClipError("writing mp4 clips needs PyAV (pip install av)") from exc
    from fractions import Fraction

    images = [_as_rgb8(f) for f in frames]
    if len({im.shape for im in images}) != 1:
        raise ClipError(f"{path.name}: the frames of one clip have different sizes")
    height, width = images[0].shape[:2]
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        # H.264 in yuv420p needs even sizes; a border row or column is cropped, never padded.
        stream.height, stream.width = height - height % 2, width - width % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for pixels in images:
            cropped = np.ascontiguousarray(pixels[: stream.height, : stream.width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(cropped, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


class _FolderSequence:
    """The frames in the annotated frame's folder."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.name = folder.relative_to(root).as_posix()
        self.files = sequence_frames(folder)
        self.index = {f: i for i, f in enumerate(self.files)}
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def center(self, frame: Path) -> int:
        return self.index[frame]

    def frames(self, positions: list[int]) -> list[Path]:
        return [self.files[i] for i in positions]

    def describe(self, positions: list[int]) -> list[str]:
        return [self.files[i].relative_to(self.root).as_posix() for i in positions]


class _VideoSequence:
    """A recorded video whose frame numbers name the annotated frames (Cholec80's frames
    are numbers of frames of its 25 fps videos)."""

    def __init__(self, path: Path, root: Path) -> None:
        import decord

        self.name = path.relative_to(root).as_posix()
        try:
            self.reader = decord.VideoReader(str(path), num_threads=1)
        except Exception as exc:  # decord raises DECORDError for corrupt containers
            raise ClipError(f"{path}: not a readable video ({exc})") from None

    def __len__(self) -> int:
        return len(self.reader)

    def center(self, frame: Path) -> int:
        if not frame.stem.isdigit():
            raise ClipError(
                f"{frame.name}: clips from a video need frames named by their frame number"
            )
        return int(frame.stem)

    def frames(self, positions: list[int]) -> list[np.ndarray]:
        return list(self.reader.get_batch(positions).asnumpy())

    def describe(self, positions: list[int]) -> list[str]:
        return [f"{self.name}#{i}" for i in positions]


def cut_clips(
    records_file: str | Path,
    data_root: str | Path | None,
    out_dir: str | Path,
    settings: ClipSettings,
    source_video: str | None = None,
) -> dict[str, Any]:
    """Clips around the annotated frames of `records_file` (one clip per distinct frame).
    With `source_video` (a path under the data root in which `{sequence}` stands for the
    name of the annotated frame's folder, e.g. "videos/video{sequence:0>2}.mp4"), clips
    are cut from that video, the frame's name being its frame number there."""
    records_file = Path(records_file)
    root = (Path(data_root) if data_root is not None else records_file.parent).resolve()
    out = Path(out_dir)
    records = load_records(records_file, root)
    by_frame: dict[Path, list] = {}
    for rec in records:
        frames = [path for _, path, _ in rec.media]
        if len(frames) != 1 or frames[0].suffix.lower() not in IMAGE_SUFFIXES:
            raise ClipError(
                f"{records_file}: sample {rec.id!r} has {len(frames)} media "
                f"({[f.name for f in frames]}); clips are cut around one annotated frame image"
            )
        by_frame.setdefault(frames[0], []).append(rec)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    sequences: dict[Path, _FolderSequence | _VideoSequence] = {}
    skipped: dict[str, list[str]] = {"sequence_too_short": [], "too_close_to_an_end": [],
                                     "frame_missing": [], "video_missing": []}  # fmt: skip
    clip_lines, clip_records, per_sequence, reused = [], [], Counter(), 0
    for frame, recs in tqdm(by_frame.items(), desc="clips", unit="clip"):
        relative = frame.relative_to(root).as_posix()
        if source_video is None:
            if not frame.is_file():
                skipped["frame_missing"].append(relative)
                continue
            key = frame.parent
            if key not in sequences:
                sequences = {key: _FolderSequence(key, root)}  # one sequence open at a time
        else:
            try:
                key = (root / source_video.format(sequence=frame.parent.name)).resolve()
            except (KeyError, IndexError, ValueError) as exc:
                raise ClipError(f"source video {source_video!r}: only {{sequence}} may be "
                                f"named ({exc})") from None  # fmt: skip
            if not key.is_relative_to(root) or not key.is_file():
                skipped["video_missing"].append(f"{relative} ({key})")
                continue
            if key not in sequences:
                sequences = {key: _VideoSequence(key, root)}
        sequence = sequences[key]
        center = sequence.center(frame)
        if center >= len(sequence):
            raise ClipError(f"{relative}: frame {center} is beyond {sequence.name}'s "
                            f"{len(sequence)} frames")  # fmt: skip
        positions = clip_positions(center, len(sequence), settings)
        if positions is None:
            reason = (
                "sequence_too_short" if settings.span > len(sequence) else "too_close_to_an_end"
            )
            skipped[reason].append(relative)
            continue
        cid = _clip_id(relative)
        target = out / "clips" / (cid if settings.format == "frames" else f"{cid}.mp4")
        if target.exists():
            reused += 1
        elif settings.format == "frames":
            _write_folder(sequence.frames(positions), target)
        else:
            _write_mp4(sequence.frames(positions), target, settings.fps)
        video = target.relative_to(out).as_posix()
        per_sequence[sequence.name] += 1
        slot = positions.index(center)
        clip_lines.append({
            "id": cid, "video": video, "sequence": sequence.name,
            "frames": sequence.describe(positions), "annotated_frame": relative,
            "clip_center": slot, "records": [r.id for r in recs],
        })  # fmt: skip
        for rec in recs:
            clip_records.append(_as_clip_record(rec, video, slot))
    written = {}
    for name, rows in (("clips.jsonl", clip_lines), ("clip_records.jsonl", clip_records)):
        path = out / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        tmp.replace(path)
        written[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    summary = {
        "records_file": str(records_file),
        "data_root": str(out.resolve()),
        "settings": asdict(settings),
        "source_video": source_video,
        "annotated_frames": len(by_frame),
        "clips": len(clip_lines),
        "clips_reused": reused,
        "clip_records": len(clip_records),
        "clips_per_sequence": dict(sorted(per_sequence.items())),
        "skipped": {k: len(v) for k, v in skipped.items()},
        "skipped_examples": {k: v[:5] for k, v in skipped.items() if v},
        "sha256": written,
    }
    (out / "clips.summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    return summary


def _as_clip_record(rec, video: str, slot: int) -> dict[str, Any]:
    conversations = [
        {**turn, "value": turn["value"].replace("<image>", "<video>")} for turn in rec.conversations
    ]
    return {"id": f"{rec.id}-clip", "videos": [video], "conversations": conversations,
            **rec.meta, "clip_center": slot}  # fmt: skip
