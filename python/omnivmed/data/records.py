"""LLaVA-style instruction records, from JSON (a list) or JSONL (one record per line).

    {"id": "ct-001", "volumes": ["ct/001.nii.gz"], "conversations": [
        {"from": "human", "value": "VOLUME\\nWhat organ is shown?"},
        {"from": "gpt", "value": "The liver."}]}

(VOLUME stands for `VisualKind.VOLUME.marker`.)

Media lists: "images", "volumes", "videos" (plus LLaVA's single "image" / "video"). The
order of items in a sample follows the markers in the conversation: each marker takes the
next item of its own kind (the markers are `VisualKind.marker`, models/kinds.py; a sample
with only one kind may use the image marker for all). Paths are relative to the data root
and must stay inside it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.kinds import MARKER_PATTERN, VisualKind
from ..processing.intensity import INTENSITY_MODES
from .files import UnsafePathError, inside_root

_KIND_KEYS = {"images": VisualKind.IMAGE, "image": VisualKind.IMAGE, "videos": VisualKind.VIDEO,
              "video": VisualKind.VIDEO, "volumes": VisualKind.VOLUME, "volume": VisualKind.VOLUME}  # fmt: skip
logger = logging.getLogger(__name__)


class RecordError(ValueError):
    pass


_MEDIA_KEYS = ("images", "image", "videos", "video", "volumes", "volume")


@dataclass
class Record:
    """One sample. `meta` keeps the record's other fields (dataset, split, modality,
    answer, ...) for evaluation and statistics."""

    id: str
    conversations: list[dict[str, Any]]
    media: list[tuple[VisualKind, Path, dict[str, Any]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The media paths as the record gives them (relative to the data root, links not
    # followed), in the order of `media`.
    sources: list[str] = field(default_factory=list)


_MEDIA_OPTIONS = ("start", "end", "ct_window", "intensity")
# Evaluation fields (omnivmed-eval, docs/metrics.md): kept in `meta`, checked here.
EVAL_TEXT_FIELDS = ("answer", "dataset", "split", "modality", "question_type", "language",
                    "source_id")  # fmt: skip
ANSWER_TYPES = ("closed", "open")


def check_eval_fields(raw: dict[str, Any], sample_id: str) -> None:
    for name in EVAL_TEXT_FIELDS:
        if name in raw and not isinstance(raw[name], (str, int, float)):
            raise RecordError(
                f"sample {sample_id!r}: field {name!r} must be text, got {raw[name]!r}"
            )
    if "answer_type" in raw and raw["answer_type"] not in ANSWER_TYPES:
        raise RecordError(
            f"sample {sample_id!r}: field 'answer_type' must be one of {ANSWER_TYPES} (the "
            f"dataset's own annotation), got {raw['answer_type']!r}"
        )
    choices = raw.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices)
    ):
        raise RecordError(
            f"sample {sample_id!r}: field 'choices' must be a non-empty list of option texts"
        )
    letter = raw.get("answer_choice")
    if letter is not None:
        count = len(choices) if isinstance(choices, list) else 26
        valid = [chr(ord("A") + i) for i in range(count)]
        if str(letter).strip().strip("().").upper() not in valid:
            raise RecordError(
                f"sample {sample_id!r}: field 'answer_choice' must be one of {valid}, got {letter!r}"
            )


def _check_media_options(options: dict[str, Any], sample_id: str) -> None:
    """Per-medium settings: start/end seconds (video), a CT window name or [level, width],
    an intensity mode (auto, ct_window, percentile, none)."""
    unknown = sorted(set(options) - set(_MEDIA_OPTIONS))
    if unknown:
        raise RecordError(
            f"sample {sample_id!r}: unknown media options {unknown}; known: {list(_MEDIA_OPTIONS)}"
        )
    for key in ("start", "end"):
        v = options.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
        ):
            raise RecordError(f"sample {sample_id!r}: {key} must be seconds >= 0, got {v!r}")
    if options.get("intensity", "auto") not in INTENSITY_MODES:
        raise RecordError(
            f"sample {sample_id!r}: intensity must be one of {list(INTENSITY_MODES)}, "
            f"got {options['intensity']!r}"
        )
    window = options.get("ct_window")
    if window is not None and not isinstance(window, str):
        ok = (
            isinstance(window, list) and len(window) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in window)
            and window[1] > 0
        )  # fmt: skip
        if not ok:
            raise RecordError(
                f"sample {sample_id!r}: ct_window must be a window name or [level, width > 0], got {window!r}"
            )
        options["ct_window"] = tuple(window)


def _resolve(
    root: Path, value: Any, sample_id: str, defaults: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    options: dict[str, Any] = dict(defaults or {})
    if isinstance(value, dict):  # {"path": ..., "start": ..., "end": ..., "ct_window": ...}
        options.update({k: v for k, v in value.items() if k != "path"})
        value = value.get("path")
        _check_media_options(options, sample_id)
    if not isinstance(value, str) or not value:
        raise RecordError(
            f"sample {sample_id!r}: a media entry must be a path string, got {value!r}"
        )
    try:
        return inside_root(root, value), options
    except UnsafePathError as exc:
        raise RecordError(f"sample {sample_id!r}: {exc}") from None


def parse_record(
    raw: dict[str, Any], root: Path, index: int, defaults: dict[str, Any] | None = None
) -> Record:
    if not isinstance(raw, dict):
        raise RecordError(f"record #{index}: expected a JSON object, got {type(raw).__name__}")
    sample_id = str(raw.get("id", f"#{index}"))
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError(f"sample {sample_id!r}: 'conversations' must be a non-empty list")
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(
                f"sample {sample_id!r}: every turn must be an object with a string 'value', got {turn!r}"
            )
    by_kind: dict[VisualKind, list] = {k: [] for k in VisualKind}
    for key, kind in _KIND_KEYS.items():
        if key in raw:
            values = raw[key] if isinstance(raw[key], list) else [raw[key]]
            by_kind[kind] += [
                (*_resolve(root, v, sample_id, defaults), v["path"] if isinstance(v, dict) else v)
                for v in values
            ]
    kinds_present = [k for k in VisualKind if by_kind[k]]
    markers = [
        VisualKind.from_marker(m)
        for turn in convs
        for m in MARKER_PATTERN.findall(str(turn.get("value", "")))
    ]
    total = sum(len(v) for v in by_kind.values())
    if len(markers) != total:
        raise RecordError(f"sample {sample_id!r}: the conversation has {len(markers)} visual markers but "
                          f"the record lists {total} media files")  # fmt: skip
    media, sources, used = [], [], {k: 0 for k in VisualKind}
    for marker_kind in markers:
        kind = marker_kind
        if marker_kind == VisualKind.IMAGE and len(kinds_present) == 1:
            kind = kinds_present[0]  # a plain image marker in a one-kind sample
        if used[kind] >= len(by_kind[kind]):
            raise RecordError(
                f"sample {sample_id!r}: more {kind.name.lower()} markers than {kind.name.lower()} files"
            )
        path, options, source = by_kind[kind][used[kind]]
        used[kind] += 1
        media.append((kind, path, options))
        sources.append(source)
    check_eval_fields(raw, sample_id)
    meta = {k: v for k, v in raw.items() if k not in ("id", "conversations", *_MEDIA_KEYS)}
    return Record(sample_id, convs, media, meta, sources)


def summary_path(data_file: str | Path) -> Path:
    """Where the tool that wrote a data file (`convert`, `mix`) leaves its summary."""
    return Path(data_file).with_suffix(".summary.json")


def default_data_root(data_file: str | Path) -> Path:
    """The data root of a data file given without one: the root its writer recorded in the
    summary beside it (`omnivmed-data convert` writes paths relative to the release and
    records the release there), else the file's own folder. Every reader of data files
    defaults through here, so a converted file reads the same in every tool."""
    data_file = Path(data_file)
    summary = summary_path(data_file)
    if not summary.is_file():
        return data_file.parent
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(
            f"{summary}: not a readable summary ({exc}); pass the data root"
        ) from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data_root"), str):
        return data_file.parent
    if Path(str(recorded.get("output", ""))).name != data_file.name:
        return data_file.parent  # the summary of another file
    root = Path(recorded["data_root"])
    if not root.is_dir():
        raise RecordError(
            f"{data_file}: its data root {root} (recorded in {summary}) is not a folder; "
            "pass the data root where the media are now"
        )
    return root


def load_records(
    path: str | Path,
    root: str | Path | None = None,
    on_error: str = "raise",
    media_defaults: dict[str, Any] | None = None,
) -> list[Record]:
    """Read a .json (list) or .jsonl file; media paths resolve against `root` (default:
    `default_data_root`). A record that cannot be parsed is an error, or with
    `on_error="skip"` is left out with a warning that names it and counts the skips.
    `media_defaults` are media options for every record of the file (a dataset's
    `intensity`, say); a record's own entry wins."""
    if media_defaults:
        _check_media_options(dict(media_defaults), f"defaults of {path}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    root = Path(root) if root is not None else default_data_root(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        if path.suffix == ".jsonl":
            raws = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        raws.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RecordError(f"{path}, line {number}: invalid JSON ({exc})") from exc
        else:
            raws = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(raws, list):
        raise RecordError(f"{path}: expected a list of records")
    if not raws:
        raise RecordError(f"{path}: holds no records")
    records, skipped = [], []
    for i, raw in enumerate(raws):
        try:
            records.append(parse_record(raw, root, i, media_defaults))
        except RecordError as exc:
            if on_error != "skip":
                raise RecordError(f"{path}: {exc}") from exc
            skipped.append(str(exc))
    if skipped:
        logger.warning("%s: skipped %d of %d records: %s", path, len(skipped), len(raws),
                       "; ".join(skipped[:5]))  # fmt: skip
    if not records:
        raise RecordError(f"{path}: every record was skipped ({skipped[0]})")
    return records
