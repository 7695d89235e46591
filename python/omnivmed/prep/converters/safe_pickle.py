"""Reading downloaded pickles without running their code: only plain containers, strings
and numbers are admitted; any reference to a class or function (which is how a pickle
runs code) is refused."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class RefusedPickle(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise RefusedPickle(
            f"refused: the pickle refers to {module}.{name}; only plain lists, dicts, strings "
            "and numbers are read"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused: the pickle uses persistent ids")


def load_plain_pickle(path: str | Path) -> Any:
    with Path(path).open("rb") as f:
        return _PlainUnpickler(io.BufferedReader(f)).load()
