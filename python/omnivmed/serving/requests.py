"""From an OpenAI chat request to our model inputs: content parts -> media files (data URLs
written to a private temporary folder, paths only inside the media root), messages ->
a chat with one marker per medium, sampling settings checked. Every refusal is a
`RequestError` with the HTTP status to answer."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inference.generate import Sampling
from ..models.kinds import MARKER_PATTERN, VisualKind

# OpenAI's image part, vLLM's video part, and our volume part (a NIfTI file or a DICOM
# series: a folder under the media root, or uploaded as .nii.gz / a zip of .dcm files).
PART_KINDS = {
    "image_url": VisualKind.IMAGE,
    "video_url": VisualKind.VIDEO,
    "volume_url": VisualKind.VOLUME,
}
# The temperature a request gets when it names none: OpenAI's, so a client that omits it
# gets sampled (varying) answers; reproducible ones need temperature 0 or a seed.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_TOKENS = 256  # or the server's limit, when lower
# Seeds are signed 64-bit integers, as OpenAI's API and torch's generators take them.
SEED_RANGE = (-(2**63), 2**63 - 1)
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)$", re.DOTALL)
MAX_ZIP_ENTRIES = 4096
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
           "image/bmp": ".bmp", "image/tiff": ".tif", "video/mp4": ".mp4", "video/webm": ".webm",
           "video/x-msvideo": ".avi", "video/quicktime": ".mov", "application/gzip": ".nii.gz",
           "application/x-gzip": ".nii.gz", "application/zip": ".zip"}  # fmt: skip


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class ParsedRequest:
    messages: list[dict[str, str]]
    media: list[tuple[VisualKind, Path]]
    sampling: Sampling
    stream: bool
    model: str


@dataclass(frozen=True)
class MediaLimits:
    """How many media parts one request, and one message of it, may hold."""

    per_request: int
    per_message: int


def shown(value: Any, width: int = 40) -> str:
    """A client's value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{key}' must be a number, got {shown(value)}")
    # Compared before any float conversion: an integer too large for a float is out of range.
    if not (low <= value <= high) or not math.isfinite(value):
        raise RequestError(400, f"'{key}' must be in [{low}, {high}], got {shown(value)}")
    return float(value)


def parse_sampling(body: dict, max_tokens_limit: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"'max_tokens' must be a positive integer, got {shown(max_tokens)}")
    if max_tokens > max_tokens_limit:
        raise RequestError(
            400,
            f"'max_tokens' is {shown(max_tokens)}; this server allows at most {max_tokens_limit}",
        )
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 4
    ):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 non-empty strings")
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n' must be 1")
    return Sampling(max_tokens, _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
                    _number(body, "top_p", DEFAULT_TOP_P, 1e-6, 1.0), stop, _seed(body))  # fmt: skip


def parse_model(body: dict, default: str) -> str:
    """The model name to echo back: the request's (a short string) or the server's."""
    name = body.get("model")
    if name is None or name == "":
        return default
    if not isinstance(name, str) or len(name) > 256:
        raise RequestError(
            400, f"'model' must be a string of at most 256 characters, got {shown(name)}"
        )
    return name


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise RequestError(
            400, f"'seed' must be an integer in [-2**63, 2**63 - 1], got {shown(seed)}"
        )
    return seed


class MediaResolver:
    """Turns a part's URL into a local path: a data URL (written to this request's
    temporary folder, at most `max_bytes` decoded) or a path inside `media_root`."""

    def __init__(self, media_root: Path | None, max_bytes: int, workdir: Path):
        self.media_root = media_root.resolve() if media_root else None
        self.max_bytes = max_bytes
        self.workdir = workdir
        self.count = 0
        # Local path -> what the client may see of it: the path it sent, or which upload.
        self.names: dict[str, str] = {}

    def public(self, message: str) -> str:
        """`message` with server-side paths (the temporary folder, the media root) replaced
        by the names the client knows."""
        for local in sorted(self.names, key=len, reverse=True):
            message = message.replace(local, self.names[local])
        message = message.replace(str(self.workdir), "<upload>")
        if self.media_root is not None:
            message = message.replace(f"{self.media_root}/", "").replace(
                str(self.media_root), "<media root>"
            )
        return message

    def __call__(self, kind: VisualKind, url: Any) -> Path:
        if not isinstance(url, str) or not url:
            raise RequestError(400, f"a {kind.name.lower()} part needs a 'url' string")
        if url.startswith("data:"):
            return self._data_url(kind, url)
        if re.match(r"^[a-z][a-z0-9+.-]*://", url) and not url.startswith("file://"):
            raise RequestError(400, f"remote URLs are not fetched ({shown(url.split('://')[0])}://...): send a data URL or a path under the media root")  # fmt: skip
        if self.media_root is None:
            raise RequestError(400, "this server has no media root: send media as data URLs")
        relative = url.removeprefix("file://")
        path = (self.media_root / relative).resolve()
        if not path.is_relative_to(self.media_root):
            raise RequestError(403, f"{shown(url, 80)} is outside the media root")
        if not path.exists():
            raise RequestError(404, f"{shown(url, 80)} does not exist under the media root")
        if path.is_dir():  # a DICOM or frame folder: links inside it may not lead out either
            for inner in path.iterdir():
                if not inner.resolve().is_relative_to(self.media_root):
                    raise RequestError(
                        403,
                        f"{shown(url, 80)} holds {shown(inner.name)}, which points outside "
                        "the media root",
                    )
        self.names[str(path)] = relative
        return path

    def _data_url(self, kind: VisualKind, url: str) -> Path:
        match = _DATA_URL.match(url[:200]) and _DATA_URL.match(url)
        if not match:
            raise RequestError(400, "a data URL must be data:<type>;base64,<data>")
        mime = (match.group(1) or "").lower()
        encoded = match.group(3)
        if len(encoded) * 3 // 4 > self.max_bytes:
            raise RequestError(413, f"a media part is over the {self.max_bytes}-byte limit")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "a data URL's base64 payload is malformed") from None
        suffix = _SUFFIX.get(mime)
        allowed = {VisualKind.IMAGE: "image/", VisualKind.VIDEO: "video/",
                   VisualKind.VOLUME: "application/"}[kind]  # fmt: skip
        if suffix is None or not mime.startswith(allowed):
            raise RequestError(
                415, f"unsupported media type {shown(mime)} for a {kind.name.lower()} part"
            )
        self.count += 1
        path = self._dicom_zip(data) if suffix == ".zip" else self._write(data, suffix)
        self.names[str(path)] = f"uploaded {kind.name.lower()} {self.count}"
        return path

    def _write(self, data: bytes, suffix: str) -> Path:
        path = self.workdir / f"part{self.count}{suffix}"
        path.write_bytes(data)
        return path

    def _dicom_zip(self, data: bytes) -> Path:
        folder = self.workdir / f"dicom{self.count}"
        folder.mkdir()
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            entries = [i for i in archive.infolist() if not i.is_dir()]
        except zipfile.BadZipFile:
            raise RequestError(400, "the volume's zip archive is corrupt") from None
        if len(entries) > MAX_ZIP_ENTRIES:
            raise RequestError(
                413, f"the DICOM archive holds {len(entries)} files; at most {MAX_ZIP_ENTRIES}"
            )
        total = 0
        try:
            for n, info in enumerate(entries):
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise RequestError(
                        415, "the DICOM archive may use only stored or deflated entries"
                    )
                # Names from the archive never become paths: files are numbered. Bytes are
                # counted as they are unpacked, not as the archive declares them.
                with archive.open(info) as src, (folder / f"{n:05d}.dcm").open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise RequestError(
                                413, f"the DICOM archive unpacks to over {self.max_bytes} bytes"
                            )
                        dst.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise RequestError(400, f"the volume's zip archive is corrupt ({exc})") from None
        if total == 0:
            raise RequestError(400, "the volume's zip archive holds no files")
        return folder


def _media_parts(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return 0
    return sum(isinstance(part, dict) and part.get("type") in PART_KINDS for part in content)


def check_media_counts(raw: list, limits: MediaLimits) -> None:
    """Refuse a request with too many media parts before any of them is read."""
    counts = [_media_parts(m) for m in raw]
    for i, n in enumerate(counts):
        if n > limits.per_message:
            raise RequestError(413, f"messages[{i}] has {n} media parts; this server allows "
                                    f"{limits.per_message} per message")  # fmt: skip
    if sum(counts) > limits.per_request:
        raise RequestError(413, f"the request has {sum(counts)} media parts; this server "
                                f"allows {limits.per_request}")  # fmt: skip


def parse_messages(
    raw: Any, resolve: MediaResolver, limits: MediaLimits
) -> tuple[list[dict[str, str]], list[tuple[VisualKind, Path]]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list")
    check_media_counts(raw, limits)
    messages, media = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind_name = part.get("type") if isinstance(part, dict) else None
                if kind_name == "text" and isinstance(part.get("text"), str):
                    _no_markers(part["text"], i)
                    pieces.append(part["text"])
                elif kind_name in PART_KINDS:
                    if m["role"] != "user":
                        raise RequestError(
                            400, f"messages[{i}]: media parts are allowed in user messages only"
                        )
                    kind = PART_KINDS[kind_name]
                    spec = part.get(kind_name)
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    media.append((kind, resolve(kind, url)))
                    pieces.append(kind.marker)
                else:
                    raise RequestError(
                        400,
                        f"messages[{i}].content[{j}]: unknown content part type {shown(kind_name)}",
                    )
            text = "\n".join(pieces)
        else:
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts")
        if isinstance(content, str):
            _no_markers(content, i)
        messages.append({"role": m["role"], "content": text})
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's")
    return messages, media


def _no_markers(text: str, index: int) -> None:
    if MARKER_PATTERN.search(text):
        raise RequestError(
            400,
            f"messages[{index}]: marker text such as {VisualKind.IMAGE.marker} is reserved; "
            "send media as parts",
        )
