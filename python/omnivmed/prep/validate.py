"""`omnivmed-data validate`: check a data file against the record schema and the media on
disk, without training: every record parsed (fields, marker counts, evaluation fields,
paths inside the data root, links included), every medium present, a regular file or a
folder holding no link that leads outside the data root, and readable by its reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.files import UnsafePathError, check_folder, regular_file
from ..data.records import RecordError, default_data_root, parse_record
from ..models.kinds import VisualKind
from ..processing.errors import MediaError
from ..processing.readers import read_image, read_video, read_volume


def _read(kind: VisualKind, path: Path) -> None:
    if kind == VisualKind.IMAGE:
        read_image(path)
    elif kind == VisualKind.VOLUME:
        read_volume(path)
    else:
        read_video(path, num_frames=2)  # opens and decodes, without reading every frame


def _media_problem(kind: VisualKind, path: Path, root: Path, read_media: bool) -> str | None:
    """Why a medium cannot be used (None when it can)."""
    if not path.exists():
        return f"{path} is missing"
    try:
        if path.is_dir():
            check_folder(root, path)  # frames or a DICOM series: no link may lead out
        else:
            regular_file(root, path)
        if read_media:
            _read(kind, path)
    except UnsafePathError as exc:
        return str(exc)
    except (MediaError, OSError, ValueError) as exc:
        return f"{path} is unreadable ({exc})"
    return None


def validate_file(
    path: str | Path, root: str | Path | None = None, read_media: bool = True
) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    root = Path(root) if root is not None else default_data_root(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        raws, bad_lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raws.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    bad_lines.append(f"line {number}: invalid JSON ({exc.msg})")
    else:
        raws, bad_lines = json.loads(text), []
    problems: list[str] = list(bad_lines)
    kinds: Counter = Counter()
    ids: Counter = Counter()
    checked: dict[Path, str | None] = {}
    for i, raw in enumerate(tqdm(raws, desc=f"validate {path.name}", disable=len(raws) < 200)):
        try:
            record = parse_record(raw, root, i)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        ids[record.id] += 1
        for kind, media_path, _ in record.media:
            kinds[kind.name.lower()] += 1
            if media_path not in checked:
                checked[media_path] = _media_problem(kind, Path(media_path), root, read_media)
            if checked[media_path]:
                problems.append(f"sample {record.id!r}: {checked[media_path]}")
    problems += [f"id {i!r} is used {n} times" for i, n in ids.items() if n > 1]
    return {"file": str(path), "data_root": str(root), "records": len(raws) + len(bad_lines),
            "valid_records": sum(ids.values()), "media": dict(kinds), "media_files": len(checked),
            "problems": problems}  # fmt: skip
