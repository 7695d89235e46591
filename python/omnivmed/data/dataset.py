"""A lazy instruction dataset: records are parsed up front, media read per item."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..processing.errors import MediaError, sample_prefix
from ..processing.processor import Media, OmniVMedProcessor
from ..processing.prompt import ConversationError
from .records import Record, load_records

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    pass


class InstructionDataset(Dataset):
    """Items are processed samples, or None for a skipped one (`on_error="skip"`); the
    collator counts the skips in every batch so they are reported, never silent."""

    def __init__(self, records: list[Record] | str | Path, processor: OmniVMedProcessor,
                 root: str | Path | None = None, on_error: str = "raise", prune: bool | None = None) -> None:  # fmt: skip
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.records = (
            load_records(records, root, on_error)
            if isinstance(records, (str, Path))
            else list(records)
        )
        self.processor = processor
        self.on_error = on_error
        self.prune = prune

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        media = [Media(kind, path, options) for kind, path, options in record.media]
        try:
            return self.processor(record.conversations, media, record.id, prune=self.prune)
        except (MediaError, ConversationError, ValueError) as exc:
            if self.on_error == "raise":
                # The processor's errors already name the sample: name it once, with its index.
                message = str(exc).removeprefix(sample_prefix(record.id))
                raise SampleError(f"sample {record.id!r} (index {index}): {message}") from exc
            logger.warning("skipping sample %r: %s", record.id, exc)
            return None
