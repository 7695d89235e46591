"""Readers: images (Pillow), volumes (NIfTI via nibabel, DICOM series via pydicom,
.npy/.npz) and videos (decord), into float arrays. Every failure is a `MediaError` that
names the file; sizes are checked against a memory limit before any voxel is loaded."""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MediaError

DEFAULT_MAX_BYTES = 2 << 30  # refuse volumes/videos whose float32 data would exceed 2 GiB
DEFAULT_MAX_SECONDS = 300.0  # a file that takes longer to read is an error


class Deadline:
    """A time bound on reading one medium, checked between frames, slices and files (a
    single decode call is bounded by the file's size, which is checked first)."""

    def __init__(self, path: object, seconds: float | None) -> None:
        self.path, self.seconds = path, seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise MediaError(
                self.path, f"reading took longer than max_read_seconds = {self.seconds:g} s"
            )


@dataclass
class Volume:
    """Axial slices `[S, H, W]` (or `[S, H, W, 3]` for a 3-channel array) float32, CT in
    Hounsfield units when the source says so. `slice_positions` (mm along the scan, one
    per slice, increasing) when the file records where its slices are."""

    data: np.ndarray
    modality: str  # "CT", "MR" or "unknown"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # slice, row, column (mm)
    source: str = ""
    slice_positions: np.ndarray | None = None


@dataclass
class Video:
    """Frames `[F, H, W, 3]` float32 in [0, 1], and their times in seconds."""

    frames: np.ndarray
    timestamps: list[float] = field(default_factory=list)
    source: str = ""
    timed: bool = True  # False for frame images, whose times are assumed (1 per second)


def _check_size(path: Path, shape: Sequence[int], max_bytes: int) -> None:
    need = 4 * int(np.prod([int(s) for s in shape], dtype=np.float64))
    if need > max_bytes:
        raise MediaError(path, f"declared size {tuple(int(s) for s in shape)} needs {need / 2**30:.1f} GiB as float32, "
                         f"over the limit of {max_bytes / 2**30:.1f} GiB")  # fmt: skip


def _require_file(path: Path) -> None:
    """A regular file, never a named pipe, socket or device (reading one could block
    forever or never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MediaError(path, "file not found") from None
    except OSError as exc:
        raise MediaError(path, f"cannot access the file ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        kind = (
            "a folder" if stat.S_ISDIR(mode)
            else "a named pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )  # fmt: skip
        raise MediaError(path, f"expected a regular file, found {kind}")


def _check_finite(path: Path, data: np.ndarray) -> None:
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise MediaError(path, f"{bad} voxels are NaN or infinite")


# ---- images -----------------------------------------------------------------------------
def read_image(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """PNG/JPEG/TIFF/... 8- or 16-bit, grayscale or RGB -> `[H, W, C]` float32 in [0, 1]
    (C = 1 or 3). The size the header declares is checked against `max_bytes` before any
    pixel is decoded; a float image with NaN or infinite pixels is an error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            # Reading then normalising makes about four float32 RGB copies before the resize
            # (measured: a 13000x13000 image peaked at 6.9 GB).
            need = 4 * 3 * 4 * width * height
            if need > max_bytes:
                raise MediaError(
                    path, f"the header declares {width}x{height} pixels, which need about "
                    f"{need / 2**30:.1f} GiB to read, over the limit of {max_bytes / 2**30:.1f} GiB"
                )  # fmt: skip
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32)
                arr = arr / (65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0)
                arr = arr[..., None]
            elif mode == "F":
                arr = np.asarray(img, dtype=np.float32)
                _check_finite(path, arr)  # before min/max, which one NaN would poison
                lo, hi = float(arr.min()), float(arr.max())
                arr = ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr))[..., None]
            elif mode in ("L", "1"):
                arr = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(path, f"the image declares too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(path, f"not a readable image ({exc})") from exc
    if arr.size == 0:
        raise MediaError(path, "image has no pixels")
    _check_finite(path, arr)
    return np.clip(arr, 0.0, 1.0)


# ---- volumes ----------------------------------------------------------------------------
def read_volume(
    path: str | Path,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> Volume:
    """A NIfTI file, a DICOM series folder (or one .dcm file), or a .npy/.npz array."""
    path = Path(path)
    if not path.is_dir():
        _require_file(path)
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return read_dicom_series(path, max_bytes, Deadline(path, max_seconds))
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path, max_bytes)
    if name.endswith((".npy", ".npz")):
        return read_numpy_volume(path, max_bytes)
    raise MediaError(
        path, "unknown volume format (expected .nii, .nii.gz, .dcm, a DICOM folder, .npy or .npz)"
    )


def read_nifti(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise MediaError(path, f"not a readable NIfTI file ({exc})") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MediaError(
            path, f"expected a 3-D volume, the header declares shape {tuple(img.shape)}"
        )
    _check_size(path, shape, max_bytes)
    try:
        canonical = nib.as_closest_canonical(img)  # RAS+: axis 2 runs inferior -> superior
        data = np.asarray(canonical.get_fdata(dtype=np.float32)).reshape(canonical.shape[:3])
        zooms = canonical.header.get_zooms()[:3]
    except Exception as exc:  # truncated data, bad affine
        raise MediaError(path, f"cannot read the voxel data ({exc})") from exc
    _check_finite(path, data)
    # RAS+ -> the radiological view DICOM gives: rows anterior first, columns patient right first.
    slices = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    positions = np.arange(slices.shape[0], dtype=np.float64) * spacing[0]
    return Volume(slices, "unknown", spacing, str(path), positions)


def read_dicom_series(
    path: Path, max_bytes: int = DEFAULT_MAX_BYTES, deadline: Deadline | None = None
) -> Volume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # is_file() is false for pipes, sockets and devices, which are never opened.
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    headers = []
    deadline = deadline or Deadline(path, None)
    for f in files:
        deadline.check()
        try:
            headers.append((f, pydicom.dcmread(str(f), stop_before_pixels=True)))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            if not path.is_dir():
                raise MediaError(f, f"not a readable DICOM file ({exc})") from exc
    headers = [(f, h) for f, h in headers if "Rows" in h and "Columns" in h]
    if not headers:
        raise MediaError(path, "no DICOM images found")
    series = Counter(str(h.get("SeriesInstanceUID", "")) for _, h in headers)
    if len(series) > 1:
        found = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'}: {n} files"
            + next((f" ({d})" for _, h in headers if str(h.get("SeriesInstanceUID", "")) == uid
                    and (d := str(h.get("SeriesDescription", "")))), "")
            for uid, n in series.most_common()
        )  # fmt: skip
        raise MediaError(
            path,
            f"the folder holds {len(series)} DICOM series ({found}); give one series per folder",
        )
    samples = {int(h.get("SamplesPerPixel", 1)) for _, h in headers}
    if samples != {1}:
        photometric = sorted({str(h.get("PhotometricInterpretation", "?")) for _, h in headers})
        raise MediaError(
            path, f"color DICOM (SamplesPerPixel {sorted(samples)}, {', '.join(photometric)}): "
            "a volume needs grayscale CT/MR slices; pass a color image as an image"
        )  # fmt: skip
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    if any((int(h.Rows), int(h.Columns)) != (rows, cols) for _, h in headers):
        raise MediaError(path, "slices of one series have different sizes")
    _check_size(path, (len(headers), rows, cols), max_bytes)

    def order(item):
        h = item[1]
        pos, ori = h.get("ImagePositionPatient"), h.get("ImageOrientationPatient")
        if pos is not None and ori is not None:
            normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
            return float(np.dot(normal, np.asarray(pos, float)))
        return float(h.get("InstanceNumber", 0))

    headers.sort(key=order)
    positions = np.asarray([order(item) for item in headers], dtype=np.float64)
    slices = []
    for f, _ in headers:
        deadline.check()
        try:
            ds = pydicom.dcmread(str(f))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # truncated pixel data, unsupported transfer syntax
            raise MediaError(f, f"cannot decode the pixel data ({exc})") from exc
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        if (
            pixels.ndim == 3 and len(headers) == 1
        ):  # one multi-frame (enhanced) file: frames are slices
            _check_size(f, pixels.shape, max_bytes)
            slices.extend(pixels * slope + intercept)
        elif pixels.ndim != 2:
            raise MediaError(
                f,
                f"expected one 2-D slice per file in a series, got pixel data of shape {pixels.shape}",
            )
        else:
            slices.append(pixels * slope + intercept)  # CT -> Hounsfield units
    data = np.stack(slices)
    _check_finite(path, data)
    first = headers[0][1]
    modality = str(first.get("Modality", "unknown")) or "unknown"
    spacing_rc = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    thickness = float(first.get("SliceThickness", 1.0) or 1.0)
    located = all(h.get("ImagePositionPatient") is not None for _, h in headers)
    if not located or len(headers) != data.shape[0]:  # multi-frame files: frames are slices
        positions = np.arange(data.shape[0], dtype=np.float64) * thickness if located else None
    else:
        positions = positions - positions[0]
        if len(positions) > 1 and np.any(np.diff(positions) <= 0):
            positions = None  # slices at one position (several acquisitions): unknown
    return Volume(data, modality, (thickness, spacing_rc[0], spacing_rc[1]), str(path), positions)


def read_numpy_volume(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Volume:
    try:
        if path.name.lower().endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                key = "volume" if "volume" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise MediaError(
                        path, f"an .npz needs a 'volume' array or exactly one array, found {keys}"
                    )
                arr = archive[key]
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(path, f"not a readable NumPy file ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        what = "complex values" if arr.dtype.kind == "c" else "non-numeric values"
        raise MediaError(
            path, f"the array holds {what} (dtype {arr.dtype}); a volume needs real intensities"
        )
    if arr.ndim == 4:
        # C, D, H, W with C = 1 or 3 (M3D's layout); (3, 3, H, W) could be either axis.
        if arr.shape[0] == 3 and arr.shape[1] == 3:
            raise MediaError(
                path, f"ambiguous layout {arr.shape}: 3 channels of 3 slices, or 3 slices of 3 "
                "channels? Save a 3-channel volume as C, D, H, W with D != 3, or as D, H, W"
            )  # fmt: skip
        if arr.shape[0] not in (1, 3):
            raise MediaError(
                path, f"a 4-D array must be C, D, H, W with C = 1 or 3, got shape {arr.shape}"
            )
    elif arr.ndim != 3:
        raise MediaError(
            path,
            f"expected [slices, H, W] or [C, slices, H, W] (C = 1 or 3), got shape {arr.shape}",
        )
    _check_size(path, arr.shape, max_bytes)
    data = np.asarray(arr, dtype=np.float32)
    if data.ndim == 4:
        data = data[0] if data.shape[0] == 1 else np.ascontiguousarray(data.transpose(1, 2, 3, 0))
    _check_finite(path, data)
    return Volume(data, "unknown", source=str(path))


# ---- videos -----------------------------------------------------------------------------
def video_frame_indices(
    total: int, fps: float, *, sample_fps: float | None = None, num_frames: int | None = None,
    start: float | None = None, end: float | None = None, max_frames: int | None = None,
) -> list[int]:  # fmt: skip
    """Frame indices sampled by rate (`sample_fps`) or by count (`num_frames`) inside
    [start, end] seconds; more than `max_frames` are thinned uniformly, never cut off."""
    if sample_fps is not None and num_frames is not None:
        raise ValueError("sample videos by sample_fps or by num_frames, not both")
    first = 0 if start is None else max(0, round(start * fps))
    last = total - 1 if end is None else min(total - 1, round(end * fps))
    if last < first:
        raise ValueError(
            f"empty time range: start={start}s end={end}s in a {total / fps:.2f}s video"
        )
    span = last - first + 1
    if num_frames is not None:
        count = min(num_frames, span)
        idx = np.linspace(first, last, count).round().astype(int).tolist()
    elif sample_fps is not None:
        step = max(fps / sample_fps, 1.0)
        idx = np.arange(first, last + 1, step).round().astype(int).tolist()
    else:
        idx = list(range(first, last + 1))
    idx = [min(max(i, first), last) for i in idx]  # rounding must not step outside the range
    if max_frames is not None and len(idx) > max_frames:
        keep = np.linspace(0, len(idx) - 1, max_frames).round().astype(int)
        idx = [idx[i] for i in keep]
    return sorted(set(idx))


def read_video(
    path: str | Path | Sequence[str | Path],
    *,
    sample_fps: float | None = None,
    num_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> Video:
    """A video file (decord), or a folder / list of frame images (sorted by name)."""
    if isinstance(path, (list, tuple)) or Path(path).is_dir():
        return _read_frame_images(path, sample_fps=sample_fps, num_frames=num_frames, start=start, end=end,
                                  max_frames=max_frames, max_bytes=max_bytes,
                                  deadline=Deadline(path, max_seconds))  # fmt: skip
    path = Path(path)
    _require_file(path)
    _require_video_container(path)
    try:
        import decord
    except ImportError as exc:
        raise MediaError(path, "reading video files needs decord (pip install decord)") from exc
    # decord's own messages name its C++ sources and internal calls, not the problem; they
    # are never shown (the error names the file and what could not be done).
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps() or 25.0)
    except Exception as exc:  # decord raises DECORDError for corrupt containers
        raise MediaError(path, "not a readable video (no video stream could be opened)") from exc
    if total == 0:
        raise MediaError(path, "video has no frames")
    try:
        idx = video_frame_indices(total, fps, sample_fps=sample_fps, num_frames=num_frames,
                                  start=start, end=end, max_frames=max_frames)  # fmt: skip
    except ValueError as exc:
        raise MediaError(path, str(exc)) from exc
    try:
        height, width = reader[0].shape[:2]
    except Exception as exc:  # a stream ffmpeg opens but cannot decode (its text demuxer)
        raise MediaError(path, "not a readable video (its first frame cannot be decoded)") from exc
    _check_size(path, (len(idx), height, width, 3), max_bytes)
    try:
        deadline, chunks = Deadline(path, max_seconds), []
        for start_at in range(0, len(idx), 8):  # in chunks, so the time bound can act
            deadline.check()
            chunks.append(reader.get_batch(idx[start_at : start_at + 8]).asnumpy())
        frames = np.concatenate(chunks).astype(np.float32) / 255.0
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(path, "cannot decode the video's frames (truncated or corrupt)") from exc
    return Video(frames, [i / fps for i in idx], str(path))


def _require_video_container(path: Path) -> None:
    """Refuse an empty file or a text file before decord sees it: ffmpeg opens any text
    file as a one-frame 'video' (its tty demuxer) and then fails to decode it. Every video
    container starts with binary header bytes."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        raise MediaError(path, "empty file")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # cut mid-character at 512 bytes: still text
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else None
    if text is not None and all(c.isprintable() or c in "\t\n\r\f" for c in text):
        raise MediaError(path, "a text file, not a video container (expected MP4, AVI, MKV, ...)")


def _read_frame_images(
    path, sample_fps=None, num_frames=None, start=None, end=None, max_frames=None,
    max_bytes=DEFAULT_MAX_BYTES, deadline=None,
) -> Video:  # fmt: skip
    """Frame images, taken as one frame per second (start/end in seconds = frame numbers)."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
    else:
        files = sorted(Path(path).iterdir())
    files = [f for f in files if f.is_file()]
    if not files:
        raise MediaError(path, "no frame images")
    try:
        idx = video_frame_indices(
            len(files), 1.0, sample_fps=None if num_frames else sample_fps,
            num_frames=num_frames, start=start, end=end, max_frames=max_frames,
        )  # fmt: skip
    except ValueError as exc:
        raise MediaError(path, str(exc)) from exc
    frames = []
    deadline = deadline or Deadline(path, None)
    for i in idx:
        deadline.check()
        img = read_image(files[i], max_bytes)
        frames.append(np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img)
    if len({f.shape for f in frames}) != 1:
        raise MediaError(path, "frame images have different sizes")
    return Video(np.stack(frames), [float(i) for i in idx], str(path), timed=False)
