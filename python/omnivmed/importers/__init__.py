"""Importers: a model released by another project, as downloaded, into an omnivmed model
folder that every omnivmed tool reads (`omnivmed-import FAMILY SRC --out DST`).

An importer is one class in one file of this package, registered by its family's name
(`@IMPORTERS.register("medm-vl")`); the command lists the registered families, so adding a
family is adding one file. An importer maps the release's parts to omnivmed's parts and
settings, accounts for every tensor (each lands in the model or is named as deliberately
unused) and refuses anything else with a one-line `ReleaseError` naming what is wrong.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..registry import Registry


class ReleaseError(ValueError):
    """A release folder (or an option naming one of its parts) that cannot be imported."""


IMPORTERS: Registry = Registry(
    "model family", plural="model families", package="omnivmed.importers", error=ReleaseError
)

T = TypeVar("T")


class Importer:
    """One family of released models."""

    registered_name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for the command's list of families

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The family's own options, after SRC and --out."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """`import_release` keyword arguments from the parsed options."""
        return {}

    @classmethod
    def import_release(cls, source: Path, out: Path, **options: Any) -> dict[str, Any]:
        """Write the omnivmed folder `out` from the release folder `source`; returns a
        summary (what was read, what was left out and why)."""
        raise NotImplementedError


def write_folder(out: str | Path, build: Callable[[Path], T]) -> T:
    """Run `build(folder)` on a fresh folder beside `out`, then move it to `out`: a
    failure leaves nothing behind, and `out` never holds half an import. `out` must not
    exist yet (or be an empty folder)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ReleaseError(f"{out}: already exists; give a new folder for --out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ReleaseError(f"{parent}: the folder to write --out into does not exist")
    partial = parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        result = build(partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


__all__ = ["IMPORTERS", "Importer", "ReleaseError", "write_folder"]
