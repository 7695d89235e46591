"""Start-up chatter of third-party libraries that our commands do not print. Each message
is silenced by name where it is made; every other warning, log line and progress bar of
those libraries still shows.

- DeepSpeed, on a machine without a GPU, warns "Setting accelerator to CPU" on every start;
  torch's C++-extension helper, which DeepSpeed's op builders import, warns "No CUDA
  runtime is found". A CPU run expects both.
- DeepSpeed prints "... built successfully" after it loads its shared-memory communication
  op at `init_distributed`.
- transformers draws a "Loading weights" progress bar for every model loaded and a "Writing
  model shards" bar for every model saved, even a tiny one; a command that loads or saves a
  model says so itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

# (logger, how the dropped message starts)
_LOG_MESSAGES = (
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)
_OP_BUILT = re.compile(r"DeepSpeed \S+ built successfully\s*$")
_QUIET_BARS = ("Loading weights", "Writing model shards")


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def without_lines(func: Callable[..., Any], drop: re.Pattern[str]) -> Callable[..., Any]:
    """`func`, with the lines it prints to stdout that match `drop` left out (the others
    are printed when it returns or raises)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                return func(*args, **kwargs)
        finally:
            lines = printed.getvalue().splitlines(keepends=True)
            sys.stdout.write("".join(line for line in lines if not drop.match(line)))

    wrapper.__wrapped_quietly__ = True  # type: ignore[attr-defined]
    return wrapper


def _weight_bar_hook(previous: Callable[..., Any] | None) -> Callable[..., Any]:
    def hook(factory: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") in _QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    hook.__quiet__ = True  # type: ignore[attr-defined]
    return hook


def install() -> None:
    """Silence the messages above for this process. Imports neither DeepSpeed nor torch's
    extension helper (the log filters wait on loggers that exist before them)."""
    for name, start in _LOG_MESSAGES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in log.filters):
            log.addFilter(_DropMessage(start))
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):  # transformers >= 5.x; older ones keep the bar
        previous = hf_logging.set_tqdm_hook(None)
        if previous is not None and getattr(previous, "__quiet__", False):
            hf_logging.set_tqdm_hook(previous)  # installed already
        else:
            hf_logging.set_tqdm_hook(_weight_bar_hook(previous))


def quiet_deepspeed_op_builds() -> None:
    """Leave DeepSpeed's "... built successfully" line out of `init_distributed`. Imports
    DeepSpeed: call it where training starts, not at start-up."""
    try:  # by its full name: `deepspeed.comm.torch` as an attribute may be torch itself
        ds_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    build = getattr(ds_comm, "build_shm_op", None)
    if build is not None and not getattr(build, "__wrapped_quietly__", False):
        ds_comm.build_shm_op = without_lines(build, _OP_BUILT)
