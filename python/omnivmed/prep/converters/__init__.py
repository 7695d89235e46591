"""Dataset converters: the public datasets' official release layouts -> our instruction
records with the evaluation fields (docs/datasets.md documents each source: the files
expected, the fields used, the split rule and the expected counts).

Each converter is one file that defines a `Converter` subclass registered by name
(`@CONVERTERS.register("slake")`); `CONVERTERS` imports every module here on first lookup,
so a new source is one new file. `convert_dataset` runs one: it writes the records as
JSONL (media paths relative to the input folder, which is the data root), refuses output
where one image is in two splits, and writes and returns a summary (records per split,
modality, question type and answer type, the documented counts beside them, problems per
file with the first few named, the data root, the output's SHA-256). Every file of the release is read through
the helpers below, which refuse named pipes and links that lead outside the release.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...data.files import (
    UnsafePathError,
    atomic_write,
    inside_root,
    output_file,
    regular_file,
    write_text_atomic,
)
from ...data.records import RecordError, parse_record, summary_path
from ...models.kinds import VisualKind
from ...registry import Registry

# Longest CSV field read, in characters: far above any report or question (csv's own
# default, 128 KiB, refuses long reports), still a bound on what one row may hold.
CSV_FIELD_LIMIT = 16 << 20
# Problems named per file in the summary and on the terminal (the rest are counted).
EXAMPLES_PER_FILE = 3


class ConversionError(ValueError):
    """The input does not match the source's documented layout (names what is wrong)."""


class RefusedFileError(ConversionError):
    """A release file refused unread: a link or `..` leading outside the release, or not
    a regular file (a named pipe would block the reader forever)."""


@dataclass
class Problems:
    """Malformed lines and missing images, counted per file (an error under --strict)."""

    strict: bool = False
    by_file: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Entries a source's documented rule leaves out (not defects): reason -> count.
    by_rule: Counter = field(default_factory=Counter)
    # Files refused unread (links out of the release, pipes), named apart from the rest
    # so they are never lost among missing images.
    refused: list[str] = field(default_factory=list)

    def leave_out(self, reason: str) -> None:
        self.by_rule[reason] += 1

    def add(self, file: str | Path, what: str) -> None:
        if self.strict:
            raise ConversionError(f"{file}: {what}")
        self.by_file[str(file)].append(what)

    def refuse(self, file: str | Path, what: str) -> None:
        """A problem that is a refused file: counted with the file's problems and named."""
        self.add(file, what)
        self.refused.append(f"{Path(file).name}: {what}")

    def counts(self) -> dict[str, int]:
        return {f: len(v) for f, v in self.by_file.items()}

    def examples(self) -> dict[str, list[str]]:
        return {f: v[:EXAMPLES_PER_FILE] for f, v in self.by_file.items()}


class Converter:
    name: ClassVar[str]  # set by CONVERTERS.register
    dataset: ClassVar[str]  # the `dataset` field of every record
    # {split: records} from the release's documentation; None where none is documented.
    expected_counts: ClassVar[dict[str, int] | None] = None
    # True where the release splits questions, not images (VQA-RAD): images then appear in
    # several splits by design, and the summary counts them instead of refusing.
    images_shared_across_splits: ClassVar[bool] = False

    def __init__(self, root: Path) -> None:
        self.root = root  # the release: every file read is checked against it

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # ---- shared helpers -----------------------------------------------------------------
    def release_file(self, path: Path) -> Path:
        """`path`, checked before it is read: a regular file (a named pipe would block the
        reader forever) that no link takes outside the release."""
        try:
            regular_file(self.root, Path(os.path.abspath(path)))
        except UnsafePathError as exc:
            raise RefusedFileError(str(exc)) from None
        return path

    def require(self, path: Path, what: str) -> Path:
        try:
            inside_root(self.root, Path(os.path.abspath(path)))
        except UnsafePathError as exc:
            raise ConversionError(f"{exc}: expected {what}") from None
        if not path.exists():
            raise ConversionError(f"{path} is missing: expected {what}")
        return path

    def read_text(self, source: Path) -> str:
        """A text file of the release (a byte-order mark dropped)."""
        try:
            return self.release_file(source).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConversionError(f"{source}: not UTF-8 text ({exc})") from None

    def read_json_list(self, source: Path, what: str) -> list:
        self.release_file(source)
        try:
            rows = json.loads(source.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{source}: not {what} ({exc})") from None
        if not isinstance(rows, list) or not rows:
            raise ConversionError(f"{source}: expected a non-empty list of questions")
        return rows

    def read_csv_rows(
        self, source: Path, columns: tuple[str, ...]
    ) -> Iterator[tuple[int, str, dict[str, str]]]:
        """(row index, row key for messages, row) of a CSV (gzipped where it ends in .gz)
        that must hold `columns`; a short row's missing cells read as ""."""
        self.release_file(source)
        opener = gzip.open if source.suffix == ".gz" else open
        previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
        reader = None
        try:
            with opener(source, "rt", newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                missing = [c for c in columns if c not in (reader.fieldnames or [])]
                if missing:
                    raise ConversionError(
                        f"{source}: columns {missing} are missing (has {reader.fieldnames})"
                    )
                for i, row in enumerate(reader):
                    yield i, f"row {i + 2}", {k: v or "" for k, v in row.items() if k is not None}
        except csv.Error as exc:  # a field over the limit, a NUL byte, an unclosed quote
            # csv counts a line once it is parsed: the failing one is the next.
            line = (reader.line_num if reader is not None else 0) + 1
            raise ConversionError(f"{source}, line {line}: not a readable CSV row ({exc}; "
                                  f"fields may hold up to {CSV_FIELD_LIMIT} characters)") from None  # fmt: skip
        except UnicodeDecodeError as exc:
            raise ConversionError(f"{source}: not UTF-8 text ({exc})") from None
        except (OSError, EOFError) as exc:  # a truncated or foreign .gz
            raise ConversionError(f"{source}: not a readable table ({exc})") from None
        finally:
            csv.field_size_limit(previous_limit)

    @staticmethod
    def open_closed_qa(
        row: Any, source: Path, key: str, problems: Problems, *fields: str
    ) -> tuple[Any, ...] | None:
        """(question, answer, answer_type, *the values of `fields`) of a row annotated
        OPEN/CLOSED; None (counted) when a field is missing or the annotation is neither."""
        try:
            question, answer = str(row["question"]).strip(), str(row["answer"]).strip()
            answer_type = str(row["answer_type"]).strip().lower()
        except (KeyError, TypeError) as exc:
            problems.add(source, f"{key}: field {exc} is missing")
            return None
        if answer_type not in ("open", "closed"):
            problems.add(
                source, f"{key}: answer_type {row['answer_type']!r} is neither OPEN nor CLOSED"
            )
            return None
        try:
            return (question, answer, answer_type, *(row[f] for f in fields))
        except KeyError as exc:
            problems.add(source, f"{key}: field {exc} is missing")
            return None

    def question_answer_lines(
        self, source: Path, problems: Problems, fields: int = 2
    ) -> Iterator[tuple[int, int, list[str]]]:
        """(line number, index among the non-blank lines, its `fields` non-empty parts) of a
        "a|b[|c]" question file, the surgical VQA releases' format; other lines are
        counted."""
        text = self.read_text(source)
        shape = "|".join(["question", "answer"] if fields == 2 else ["image", "question", "answer"])
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for index, (number, line) in enumerate(lines):
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != fields or not all(parts):
                problems.add(source, f"line {number}: expected '{shape}', got {line.strip()!r}")
                continue
            yield number, index, parts

    @staticmethod
    def one_of_folders(root: Path, names: tuple[str, ...], what: str) -> str:
        """The one of `names` that exists under root (releases name some folders two ways)."""
        present = [n for n in names if (root / n).is_dir()]
        if not present:
            raise ConversionError(f"{root}: none of {list(names)} is there: expected {what}")
        if len(present) > 1:
            raise ConversionError(
                f"{root}: both {present} are there; keep the one that holds {what}"
            )
        return present[0]

    @staticmethod
    def image_ok(root: Path, relative: str, problems: Problems, source: Path, key: str) -> bool:
        """Whether the medium is there to be read; counted (and named) where it is
        missing, not a regular file, or a link leading outside the release."""
        try:
            if not inside_root(root, relative).exists():
                problems.add(source, f"{key}: image {relative} is missing")
                return False
            regular_file(root, relative)
        except UnsafePathError as exc:
            problems.refuse(source, f"{key}: image {exc}")
            return False
        return True

    @staticmethod
    def record(sample_id: str, image: str | None, question: str, answer: str, *,
               kind: VisualKind = VisualKind.IMAGE, media_options: dict[str, Any] | None = None,
               **fields: Any) -> dict[str, Any]:  # fmt: skip
        """A one-turn record about one medium of `kind` (its file `image`, marked in the
        question); `media_options` (e.g. {"intensity": "none"}) go with the medium, as
        omnivmed's record format reads them."""
        rec: dict[str, Any] = {"id": sample_id}
        if image is not None:
            rec[kind.records_key] = [{"path": image, **media_options} if media_options else image]
            question = f"{kind.marker}\n{question}"
        rec["conversations"] = [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ]
        rec["answer"] = answer
        rec.update({k: v for k, v in fields.items() if v is not None})
        return rec


CONVERTERS: Registry[type[Converter]] = Registry(
    "source", package=__name__, attribute="name", error=ConversionError
)


def converter_names() -> list[str]:
    return CONVERTERS.names()


def get_converter(name: str, root: Path) -> Converter:
    return CONVERTERS.get(name)(root)


def _media(rec: dict) -> list[str]:
    # Normalised, so "images/test/../train/x.jpg" is the same image as "images/train/x.jpg".
    return [
        os.path.normpath(p["path"] if isinstance(p, dict) else p)
        for key in ("images", "volumes", "videos")
        for p in rec.get(key, [])
    ]


def convert_dataset(
    name: str, input_dir: str | Path, out_file: str | Path, strict: bool = False
) -> dict:
    root = Path(input_dir)
    converter = get_converter(name, root)
    if not root.is_dir():
        raise ConversionError(f"{root} is not a folder (the {name} release, unpacked)")
    try:
        out = output_file(out_file)
    except UnsafePathError as exc:
        raise ConversionError(str(exc)) from None
    problems = Problems(strict=strict)
    records = []
    for i, rec in enumerate(converter.records(root, problems)):
        try:  # what training and evaluation will read, checked as they check it
            parse_record(rec, root, i)
        except RecordError as exc:
            problems.add(f"{name} record checks", f"source {rec.get('source_id')}: {exc}")
            continue
        records.append(rec)
    if not records:
        raise ConversionError(f"{root}: no records converted ({problems.counts()})")
    escaping = [m for r in records for m in _media(r) if m.startswith("..") or os.path.isabs(m)]
    if escaping:
        raise ConversionError(f"{name}: media paths lead outside {root}, e.g. {escaping[:3]}")
    ids = Counter(r["id"] for r in records)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ConversionError(f"{name}: duplicate record ids {dup[:5]}")
    # Train and test stay apart: no image may appear in two splits.
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        for m in _media(r):
            splits_of[m].add(r["split"])
    leaked = {m: sorted(s) for m, s in splits_of.items() if len(s) > 1}
    if leaked and not converter.images_shared_across_splits:
        examples = list(leaked.items())[:5]
        raise ConversionError(
            f"{name}: {len(leaked)} images appear in more than one split, e.g. {examples}; "
            "refusing output that mixes train and test"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {
        key: dict(sorted(Counter(str(r.get(key)) for r in records).items()))
        for key in ("split", "modality", "question_type", "answer_type", "language")
    }
    by_split = counts["split"]
    expected = converter.expected_counts
    summary = {
        "source": name,
        "dataset": converter.dataset,
        "records": len(records),
        "counts": counts,
        "expected_counts": expected,
        "matches_documented_counts": (
            None if expected is None else all(by_split.get(s, 0) == n for s, n in expected.items())
        ),
        "images_in_several_splits": len(leaked),
        "problems": problems.counts(),
        "problem_examples": problems.examples(),
        "refused_files": len(problems.refused),
        "refused_examples": problems.refused[:EXAMPLES_PER_FILE],
        "left_out_by_rule": dict(sorted(problems.by_rule.items())),
        "output": str(out),
        # The root the media paths are relative to; readers of the output default to it.
        "data_root": str(root.resolve()),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    write_text_atomic(summary_path(out), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
