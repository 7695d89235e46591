"""Mixtures of several instruction files with sampling ratios, described in YAML:

    seed: 0
    num_samples: 1000          # optional: defaults to the sum of the files' sizes
    splits: [train]            # optional: the records' splits to draw from (default: train)
    datasets:
      - path: pmc_vqa.json     # relative to the YAML file
        root: media/pmc        # media root (default: the data file's folder)
        ratio: 0.7
      - path: m3d_vqa.jsonl
        ratio: 0.3
        intensity: none        # optional: media options for every record of the file

Only records of the mixture's splits are drawn (records without a `split` field always
are), so a converted release's validation and test records never reach training unless
the mixture names their splits.

Each file contributes round(ratio * num_samples) samples, drawn without replacement while
it has enough and cycling through fresh shuffles beyond that; the order is shuffled with
`seed`, so the mixture is the same on every run and every rank.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from .dataset import InstructionDataset
from .records import RecordError, load_records

_KEYS = {"seed", "num_samples", "datasets", "splits"}
TRAINING_SPLITS = ("train",)
_ENTRY_KEYS = {"path", "root", "ratio", "intensity", "ct_window"}


class MixtureError(ValueError):
    pass


def sample_counts(ratios: list[float], total: int) -> np.ndarray:
    """Samples per dataset: `total` split by the ratios, largest remainders rounded up."""
    weights = np.asarray(ratios, dtype=np.float64) / sum(ratios)
    counts = np.floor(weights * total).astype(int)
    counts[np.argsort(-(weights * total - counts))[: total - counts.sum()]] += 1
    return counts


def draw(rng: np.random.Generator, size: int, count: int) -> list[int]:
    """`count` indices into a dataset of `size`: without replacement while it has enough,
    then through fresh shuffles."""
    drawn: list[int] = []
    while len(drawn) < count:
        drawn += rng.permutation(size).tolist()
    return drawn[:count]


def read_spec(yaml_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The mixture's settings and its checked dataset entries."""
    if not yaml_path.is_file():
        raise FileNotFoundError(f"mixture file {yaml_path} does not exist")
    spec = yaml.safe_load(yaml_path.read_text()) or {}
    if not isinstance(spec, dict) or set(spec) - _KEYS:
        raise MixtureError(
            f"{yaml_path}: unknown keys {sorted(set(spec) - _KEYS)}; allowed: {sorted(_KEYS)}"
        )
    entries = spec.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise MixtureError(f"{yaml_path}: 'datasets' must be a non-empty list")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - _ENTRY_KEYS:
            raise MixtureError(
                f"{yaml_path}: datasets[{k}] needs 'path' and only {sorted(_ENTRY_KEYS)}, got {entry}"
            )
    return spec, entries


def mixture_splits(yaml_path: Path, spec: dict[str, Any]) -> tuple[str, ...]:
    """The splits a mixture draws from: its `splits` list, or the training split."""
    splits = spec.get("splits", list(TRAINING_SPLITS))
    if (
        not isinstance(splits, list)
        or not splits
        or not all(isinstance(s, str) and s for s in splits)
    ):
        raise MixtureError(f"{yaml_path}: 'splits' must be a non-empty list of split names")
    return tuple(splits)


def in_splits(records: list, splits: tuple[str, ...]) -> tuple[list, dict[str, int]]:
    """The records of `splits` (and those without a split field), and the count of each
    split left out."""
    kept, left_out = [], Counter()
    for r in records:
        split = r.meta.get("split")
        if split is None or str(split) in splits:
            kept.append(r)
        else:
            left_out[str(split)] += 1
    return kept, dict(sorted(left_out.items()))


def entry_records(yaml_path: Path, k: int, entry: dict[str, Any], on_error: str = "raise") -> list:
    """The records of one dataset entry (paths and media root relative to the YAML)."""
    path = yaml_path.parent / entry["path"]
    root = yaml_path.parent / entry["root"] if "root" in entry else None
    defaults = {key: entry[key] for key in ("intensity", "ct_window") if key in entry}
    try:
        return load_records(path, root, on_error, defaults)
    except RecordError as exc:
        raise MixtureError(f"{yaml_path}: datasets[{k}]: {exc}") from exc


class MixtureDataset(Dataset):
    def __init__(self, parts: list[InstructionDataset], ratios: list[float], num_samples: int | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        if len(parts) != len(ratios) or not parts:
            raise MixtureError("a mixture needs one ratio per dataset and at least one dataset")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise MixtureError(f"ratios must be non-negative with a positive sum, got {ratios}")
        total = num_samples if num_samples is not None else sum(len(p) for p in parts)
        counts = sample_counts(ratios, total)
        rng = np.random.default_rng(seed)
        index: list[tuple[int, int]] = []
        for d, (part, count) in enumerate(zip(parts, counts, strict=True)):
            if count and len(part) == 0:
                raise MixtureError(f"dataset {d} is empty but its ratio asks for {count} samples")
            index += [(d, i) for i in draw(rng, len(part), count)]
        order = rng.permutation(len(index))
        self.parts = parts
        self.index = [index[i] for i in order]
        self.counts = counts.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        d, j = self.index[i]
        return self.parts[d][j]


def load_mixture(
    yaml_path: str | Path, processor, on_error: str = "raise", prune: bool | None = None
) -> MixtureDataset:
    yaml_path = Path(yaml_path)
    spec, entries = read_spec(yaml_path)
    splits = mixture_splits(yaml_path, spec)
    parts, ratios = [], []
    for k, entry in enumerate(entries):
        records, left_out = in_splits(entry_records(yaml_path, k, entry, on_error), splits)
        if not records and float(entry.get("ratio", 1.0)) > 0:
            raise MixtureError(
                f"{yaml_path}: datasets[{k}] has no records of splits {list(splits)} (it "
                f"holds {left_out}); name the splits to draw from with 'splits'"
            )
        parts.append(InstructionDataset(records, processor, on_error=on_error, prune=prune))
        ratios.append(float(entry.get("ratio", 1.0)))
    return MixtureDataset(parts, ratios, spec.get("num_samples"), int(spec.get("seed", 0)))
