"""Errors for unreadable or invalid inputs; messages name the file and, when known, the
sample."""

from __future__ import annotations


def sample_prefix(sample_id: str | None) -> str:
    """How an error names the sample it belongs to ('' when there is no sample, as for
    one file given on the command line)."""
    return "" if sample_id is None else f"sample {sample_id!r}: "


class MediaError(ValueError):
    """A file that cannot be read or holds invalid data."""

    def __init__(self, path: object, problem: str, sample_id: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.sample_id = sample_id
        super().__init__(f"{sample_prefix(sample_id)}{self.path}: {problem}")

    def for_sample(self, sample_id: str | None) -> MediaError:
        return MediaError(self.path, self.problem, sample_id)
