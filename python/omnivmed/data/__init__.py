"""Instruction data: record schema, datasets and mixtures, collator."""

from .collator import VisualCollator
from .dataset import InstructionDataset, SampleError
from .records import Record, load_records

__all__ = ["InstructionDataset", "Record", "SampleError", "VisualCollator", "load_records"]
