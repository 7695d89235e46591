"""Instruction data: record schema, datasets and mixtures, collator."""

from .collator import VisualCollator
from .dataset import InstructionDataset, SampleError
from .mixture import MixtureDataset, MixtureError, load_mixture
from .records import Record, load_records

__all__ = [
    "InstructionDataset",
    "MixtureDataset",
    "MixtureError",
    "Record",
    "SampleError",
    "VisualCollator",
    "load_mixture",
    "load_records",
]
