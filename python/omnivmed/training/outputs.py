"""Output folders of a run: checked before anything starts, and not left behind empty when
the run fails."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..run_folder import RUN_FILE
from .checkpoint import LOCK_FILE

# What a run writes into its folder before it has anything to keep: the folder lock and
# the run's id. A folder holding only these is as good as empty.
_BOOKKEEPING = frozenset({LOCK_FILE, RUN_FILE})


def new_folders(paths: Iterable[str | Path]) -> list[Path]:
    """The folders a run on `paths` would create: each path and its parents that do not
    exist yet, deepest first."""
    found: list[Path] = []
    for path in paths:
        path = Path(os.path.abspath(path))
        for folder in (path, *path.parents):
            if folder.exists():
                break
            if folder not in found:
                found.append(folder)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_unused(folders: Iterable[Path]) -> list[Path]:
    """Remove each of `folders` (made by a run that failed) that holds nothing but the
    run's bookkeeping, deepest first; returns the removed ones. Only pass folders from
    `new_folders`, taken before the run: a folder that existed before is never touched."""
    removed = []
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            entries = os.listdir(folder)
        except OSError:  # gone, or never made
            continue
        if not set(entries) <= _BOOKKEEPING or any(not (folder / e).is_file() for e in entries):
            continue
        try:
            for entry in entries:
                (folder / entry).unlink()
            folder.rmdir()
        except OSError:  # another process wrote into it meanwhile: keep it
            continue
        removed.append(folder)
    return removed
