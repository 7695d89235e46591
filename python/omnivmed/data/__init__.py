"""What training and inference read at run time: the record schema (`records.py`),
datasets (`dataset.py`), weighted mixtures (`mixture.py`), the collator (`collator.py`)
and safe file handling (`files.py`).

The tools that make record files from public releases (converters, clips, captions,
mixing, validation, token statistics) live in `omnivmed.prep`; nothing here imports them.
"""

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
