"""`omnivmed-data validate`: check a data file against the record schema and the media on
disk, without training: every record parsed (fields, marker counts, evaluation fields,
paths inside the data root), every medium present and readable by its reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..models.kinds import VisualKind
from ..processing.errors import MediaError
from ..processing.readers import read_image, read_video, read_volume
from .records import RecordError, parse_record


def _read(kind: VisualKind, path: Path) -> None:
    if kind == VisualKind.IMAGE:
        read_image(path)
    elif kind == VisualKind.VOLUME:
        read_volume(path)
    else:
        read_video(path, num_frames=2)  # opens and decodes, without reading every frame


def validate_file(
    path: str | Path, root: str | Path | None = None, read_media: bool = True
) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    root = Path(root) if root is not None else path.parent
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
                checked[media_path] = None
                if not Path(media_path).exists():
                    checked[media_path] = "missing"
                elif read_media:
                    try:
                        _read(kind, Path(media_path))
                    except (MediaError, OSError, ValueError) as exc:
                        checked[media_path] = f"unreadable ({exc})"
            if checked[media_path]:
                problems.append(f"sample {record.id!r}: {media_path} is {checked[media_path]}")
    problems += [f"id {i!r} is used {n} times" for i, n in ids.items() if n > 1]
    return {"file": str(path), "data_root": str(root), "records": len(raws) + len(bad_lines),
            "valid_records": sum(ids.values()), "media": dict(kinds), "media_files": len(checked),
            "problems": problems}  # fmt: skip
