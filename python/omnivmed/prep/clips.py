"""Surgical clips around annotated frames (OmniV-Med Fig. 2's video segments).

Frame-level surgical VQA (EndoVis18-VQA, Cholec80-VQA, PSI-AVA-VQA) annotates single
frames of a recorded procedure. `cut_clips` turns each annotated frame of a converted file
into a short clip of consecutive frames around it:

- a sequence is the folder that holds the annotated frame (as the record names it; links
  are not followed), its frames in natural name order (frame9 before frame10); a clip
  never takes frames from another folder, and a frame or video that is a link leading
  outside the data root is refused, never copied;
- or, where the release's frames are numbers of frames of recorded videos (Cholec80) and
  the videos are there, the sequence is the video (`source_video`, a path template with
  `{sequence}` for the frame folder's name) and the clip's frames are decoded from it;
- a clip is `window` frames, `stride` frames apart, with the annotated frame as close to
  its middle as the sequence allows: near a sequence's start or end the window moves
  inside the sequence (`edge="shift"`, the annotated frame stays on the clip's grid) or
  the frame is left out (`edge="skip"`); a sequence shorter than the clip's span is
  always left out. A clip that would take a frame annotated for another split is left
  out too, so train and test stay apart. Everything left out is counted;
- clips are written as frame folders (copies of the release's frames, or hard links with
  `link_frames`; PNGs of decoded video frames) or as mp4 files (PyAV, H.264).

Outputs in the output folder, which is the data root of everything in it:
`clips.jsonl` (one line per clip: id, video, the source frames, the annotated frame's
position; what `omnivmed-data captions` reads), `clip_records.jsonl` (each input record
asked of its clip: `videos` instead of `images`, `<video>` instead of `<image>`, the
annotated frame's position in `clip_center`), and `clips.summary.json`. A rerun keeps
finished clips: each clip is written under a temporary name and renamed when complete,
and a folder holding clips cut with other settings is refused (`clips.settings.json`).
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

from ..data.files import UnsafePathError, inside_root, output_folder, write_text_atomic
from ..data.records import default_data_root, load_records
from ..models.kinds import VisualKind

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EDGES = ("shift", "skip")
FORMATS = ("frames", "mp4")
MIN_FPS, MAX_FPS = 0.01, 1000.0


class ClipError(ValueError):
    """Settings or inputs that cannot give clips (names what is wrong)."""


@dataclass(frozen=True)
class ClipSettings:
    window: int = 8  # frames per clip
    stride: int = 1  # source frames between two clip frames
    edge: str = "shift"  # near a sequence's ends: "shift" the window inside, or "skip"
    format: str = "frames"  # "frames" (a folder per clip) or "mp4"
    # mp4 frame rate; None: a video's own rate / stride, or 1 / stride for frame folders
    fps: float | None = None
    # Hard-link the release's frames instead of copying them (no extra space, but a frame
    # edited in place changes both).
    link_frames: bool = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ClipError(f"window must be at least 1 frame, got {self.window}")
        if self.stride < 1:
            raise ClipError(f"stride must be at least 1 frame, got {self.stride}")
        if self.edge not in EDGES:
            raise ClipError(f"edge must be one of {EDGES}, got {self.edge!r}")
        if self.format not in FORMATS:
            raise ClipError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.fps is not None and not MIN_FPS <= self.fps <= MAX_FPS:
            raise ClipError(f"fps must be in [{MIN_FPS}, {MAX_FPS}], got {self.fps}")

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


def sequence_frames(folder: Path, root: Path) -> list[Path]:
    """The frame images of one sequence folder, in natural name order. A frame that is a
    link leading outside the data root is refused (it would be copied into a clip)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for frame in files:
        _check_inside(root, frame)
    return sorted(files, key=lambda p: _natural_key(p.name))


def _check_inside(root: Path, path: Path) -> None:
    try:
        inside_root(root, path)
    except UnsafePathError as exc:
        raise ClipError(str(exc)) from None


def _clip_id(frame: str) -> str:
    """Readable, and unique: two frame paths that read alike differ in the hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", str(Path(frame).with_suffix("")).replace("/", "__"))
    return f"{readable}-{hashlib.sha1(frame.encode()).hexdigest()[:8]}"


def _write_folder(frames: Sequence[Path | np.ndarray], folder: Path, link: bool) -> None:
    """Source frame files are copied (or hard-linked); decoded frames (uint8 RGB) are
    written as PNG."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(3, len(str(len(frames))))
    for i, frame in enumerate(frames):
        if isinstance(frame, Path):
            target = tmp / f"{i:0{width}d}{frame.suffix.lower()}"
            try:
                if not link:
                    raise OSError
                os.link(frame, target)
            except OSError:  # copying asked for, another filesystem, or links not allowed
                shutil.copy2(frame, target)
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
    if height < 2 or width < 2:
        raise ClipError(f"{path.name}: frames of {height}x{width} pixels are too small for H.264")
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
        self.key, self.name = folder, folder.relative_to(root).as_posix()
        self.files = sequence_frames(folder, root)
        self.index = {f: i for i, f in enumerate(self.files)}
        self.root = root
        self.fps = 1.0  # frame images carry no rate

    def __len__(self) -> int:
        return len(self.files)

    def center(self, frame: Path) -> int:
        return self.index[frame]

    def frames(self, positions: list[int]) -> list[Path]:
        return [self.files[i] for i in positions]

    def keys(self, positions: list[int]) -> list[Any]:
        return self.frames(positions)  # a frame file is its own key

    def describe(self, positions: list[int]) -> list[str]:
        return [self.files[i].relative_to(self.root).as_posix() for i in positions]


class _VideoSequence:
    """A recorded video whose frame numbers name the annotated frames (Cholec80's frames
    are numbers of frames of its 25 fps videos)."""

    def __init__(self, path: Path, root: Path) -> None:
        try:
            import decord
        except ImportError as exc:
            raise ClipError("clips from videos need decord (pip install decord)") from exc
        self.key, self.path, self.name = path, path, path.relative_to(root).as_posix()
        try:
            self.reader = decord.VideoReader(str(path), num_threads=1)
            self.fps = float(self.reader.get_avg_fps() or 25.0)
        except Exception as exc:  # decord raises DECORDError for corrupt containers
            raise ClipError(f"{path}: not a readable video ({exc})") from None

    def __len__(self) -> int:
        return len(self.reader)

    def center(self, frame: Path) -> int:
        return int(frame.stem)  # checked by the caller

    def frames(self, positions: list[int]) -> list[np.ndarray]:
        try:
            return list(self.reader.get_batch(positions).asnumpy())
        except Exception as exc:  # DECORDError: a damaged stretch of the video
            raise ClipError(f"{self.path}: cannot decode frames {positions} ({exc})") from None

    def keys(self, positions: list[int]) -> list[Any]:
        return [(self.path, i) for i in positions]

    def describe(self, positions: list[int]) -> list[str]:
        return [f"{self.name}#{i}" for i in positions]


def _frame_key(frame: Path, root: Path, source_video: str | None) -> tuple[Path, Any] | str:
    """(sequence key, the frame's key within it), or why the frame cannot be placed."""
    if source_video is None:
        return (frame.parent, frame) if frame.is_file() else "frame_missing"
    if not frame.stem.isdigit():
        return "frame_not_numbered"
    try:
        video = Path(os.path.normpath(root / source_video.format(sequence=frame.parent.name)))
    except (KeyError, IndexError, ValueError) as exc:
        raise ClipError(
            f"source video {source_video!r}: only {{sequence}} may be named ({exc})"
        ) from None
    _check_inside(root, video)
    if not video.is_file():
        return "video_missing"
    return video, (video, int(frame.stem))


def _settings_stamp(out: Path, stamp: dict[str, Any]) -> None:
    """Clips already in `out` must have been cut the same way, or a rerun would mix them."""
    path = out / "clips.settings.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != stamp:
            changed = sorted(
                k for k in stamp.keys() | before.keys() if stamp.get(k) != before.get(k)
            )
            raise ClipError(f"{out} holds clips cut with other settings ({', '.join(changed)}); "
                            "use another --out or empty it")  # fmt: skip
    path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


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
    root = Path(
        os.path.abspath(data_root if data_root is not None else default_data_root(records_file))
    )
    out = output_folder(out_dir)
    records = load_records(records_file, root)
    by_frame: dict[Path, list] = {}
    for rec in records:
        if len(rec.sources) != 1 or Path(rec.sources[0]).suffix.lower() not in IMAGE_SUFFIXES:
            raise ClipError(
                f"{records_file}: sample {rec.id!r} has {len(rec.sources)} media "
                f"({rec.sources}); clips are cut around one annotated frame image"
            )
        # As the record names it: a linked frame stays in its own sequence folder.
        by_frame.setdefault(Path(os.path.normpath(root / rec.sources[0])), []).append(rec)
    out.mkdir(parents=True, exist_ok=True)
    _settings_stamp(out, {**asdict(settings), "source_video": source_video,
                          "records_file": str(records_file.resolve()), "data_root": str(root)})  # fmt: skip
    (out / "clips").mkdir(exist_ok=True)
    skipped: dict[str, list[str]] = {reason: [] for reason in (
        "sequence_too_short", "too_close_to_an_end", "frames_of_another_split", "frame_missing",
        "frame_not_numbered", "frame_beyond_video", "video_missing")}  # fmt: skip
    placed: dict[Path, tuple[Path, Any]] = {}
    split_of: dict[Any, set[str]] = {}  # annotated frame key -> the splits of its records
    for frame, recs in by_frame.items():
        where = _frame_key(frame, root, source_video)
        if isinstance(where, str):
            skipped[where].append(frame.relative_to(root).as_posix())
            continue
        placed[frame] = where
        split_of.setdefault(where[1], set()).update(str(r.meta.get("split")) for r in recs)
    # Grouped by sequence, so one sequence (a decoded video) is open at a time.
    order = sorted(placed, key=lambda f: (str(placed[f][0]), _natural_key(f.name)))
    sequence: _FolderSequence | _VideoSequence | None = None
    clip_lines, clip_records, per_sequence, reused = [], [], Counter(), 0
    for frame in tqdm(order, desc="clips", unit="clip"):
        recs, (key, own) = by_frame[frame], placed[frame]
        relative = frame.relative_to(root).as_posix()
        if sequence is None or sequence.key != key:
            sequence = (
                _FolderSequence(key, root) if source_video is None else _VideoSequence(key, root)
            )
        center = sequence.center(frame)
        if center >= len(sequence):
            skipped["frame_beyond_video"].append(relative)
            continue
        positions = clip_positions(center, len(sequence), settings)
        if positions is None:
            too_short = settings.span > len(sequence)
            skipped["sequence_too_short" if too_short else "too_close_to_an_end"].append(relative)
            continue
        splits = split_of[own]
        if any(split_of.get(k, splits) != splits for k in sequence.keys(positions)):
            skipped["frames_of_another_split"].append(relative)
            continue
        cid = _clip_id(relative)
        target = out / "clips" / (cid if settings.format == "frames" else f"{cid}.mp4")
        if target.exists():
            reused += 1
        elif settings.format == "frames":
            _write_folder(sequence.frames(positions), target, settings.link_frames)
        else:
            fps = settings.fps or sequence.fps / settings.stride
            _write_mp4(sequence.frames(positions), target, max(MIN_FPS, fps))
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
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
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
    write_text_atomic(out / "clips.summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _as_clip_record(rec, video: str, slot: int) -> dict[str, Any]:
    conversations = [
        {**turn, "value": turn["value"].replace(VisualKind.IMAGE.marker, VisualKind.VIDEO.marker)}
        for turn in rec.conversations
    ]
    return {"id": f"{rec.id}-clip", "videos": [video], "conversations": conversations,
            **rec.meta, "clip_center": slot}  # fmt: skip
