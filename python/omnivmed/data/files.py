"""Files the dataset tools read and write.

Reading: a release or data root is a trust boundary. A path under it may be a link, but a
link (or a `..`) that leads outside the root is refused and named, so no tool copies,
sends or reports a file from elsewhere on the machine. A file that is read must be a
regular file: a named pipe would block the reader forever.

Writing: an output is written under a unique temporary name in its own folder and renamed
over the target when complete, so a crash never leaves a half-written target, and the
temporary file is removed when the write fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..processing.errors import MediaError
from ..processing.readers import _require_file  # the readers' own check: one rule everywhere


class UnsafePathError(ValueError):
    """A path that leads outside its root, a file that is not a regular file, or an output
    path that cannot be written (names the path and the flag)."""


def inside_root(root: str | Path, path: str | Path) -> Path:
    """`path` (relative to `root`, or under it) resolved, links followed; refused when a
    `..` or a link on the way leads outside `root`."""
    given, real_root = Path(os.path.abspath(root)), Path(root).resolve()
    lexical = Path(os.path.normpath(given / path))
    resolved = lexical.resolve()
    if resolved.is_relative_to(real_root):
        return resolved
    shown = lexical.relative_to(given) if lexical.is_relative_to(given) else Path(path)
    if lexical.is_relative_to(given) or lexical.is_relative_to(real_root):
        raise UnsafePathError(
            f"{shown} is a link that points outside the data root {root} (to {resolved}); "
            "links leaving the data root are not followed"
        )
    raise UnsafePathError(f"{shown} points outside the data root {root}")


def regular_file(root: Path, path: str | Path) -> Path:
    """`path` checked with `inside_root` and as a regular file (not a folder, pipe, socket
    or device), resolved."""
    resolved = inside_root(root, path)
    try:
        _require_file(resolved)
    except MediaError as exc:
        raise UnsafePathError(f"{path}: {exc.problem}") from None
    return resolved


def check_folder(root: str | Path, folder: str | Path) -> None:
    """Every entry of `folder` (frames of a clip, a DICOM series) checked with
    `inside_root`: a folder under the root may not hold a link that leads out of it."""
    for entry in Path(folder).iterdir():
        inside_root(root, entry)


def unique_temporary(target: Path) -> Path:
    """A new, empty file beside `target` with a name no other writer uses."""
    while True:
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            tmp.open("x").close()
        except FileExistsError:
            continue
        return tmp


@contextmanager
def atomic_write(
    target: str | Path, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """A file to write `target` through: a unique temporary file in `target`'s folder,
    renamed over `target` when the block ends, removed when it raises."""
    target = Path(target)
    tmp = unique_temporary(target)
    try:
        with tmp.open(mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_write(target) as f:
        f.write(text)


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file's path, checked before any work: not a folder, in a folder that
    exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise UnsafePathError(f"{flag} {path} is a folder; expected a file path")
    _creatable_folder(path.parent, flag, path)
    return path


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """An output folder's path, checked before any work: a folder or a new name, never an
    existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"{flag} {path} is an existing file; expected a folder")
    _creatable_folder(path, flag, path)
    return path


def _creatable_folder(folder: Path, flag: str, given: Path) -> None:
    """The nearest existing path at or above `folder` must be a folder (mkdir would fail
    there with a bare errno otherwise)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UnsafePathError(f"{flag} {given}: {parent} is a file, not a folder")
            return
