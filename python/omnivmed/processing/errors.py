"""Errors for unreadable or invalid inputs; messages name the file and, when known, the
sample."""

from __future__ import annotations


class MediaError(ValueError):
    """A file that cannot be read or holds invalid data."""

    def __init__(self, path: object, problem: str, sample_id: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.sample_id = sample_id
        where = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(f"{where}{self.path}: {problem}")

    def for_sample(self, sample_id: str) -> MediaError:
        return MediaError(self.path, self.problem, sample_id)
