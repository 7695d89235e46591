"""Optional dependencies, grouped as in pyproject.toml's extras, and the one message that
names the extra to install when a command needs one that is missing.

Presence is checked with `importlib.util.find_spec`, which imports nothing: DeepSpeed's
import alone takes seconds and prints accelerator probes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

# What `omnivmed-train` cannot run without (tensorboard is optional there: metrics then go
# to metrics.jsonl only). The `train` extra installs these and tensorboard.
TRAIN_MODULES = ("deepspeed", "matplotlib")


# The bar charts of `omnivmed-data tokens` and `mix` are drawn when this is installed and
# left out (the JSON and the table still written) when it is not.
CHART_MODULE = "matplotlib"
NO_CHART = "chart not drawn: matplotlib is not installed (pip install 'omnivmed[train]')"


class MissingExtraError(ImportError):
    """A command needs an optional dependency that is not installed (names the extra)."""


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module stubbed out
        return False


def require(extra: str, modules: Iterable[str], what: str) -> None:
    """Raise `MissingExtraError` naming the missing modules and the extra that installs them."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, which {verb} not installed: "
            f"pip install 'omnivmed[{extra}]'"
        )
