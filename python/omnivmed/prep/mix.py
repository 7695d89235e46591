"""`omnivmed-data mix`: one training file from a YAML mixture of converted files (the
format `omnivmed-train` reads, see data/mixture.py): only the records of the chosen
splits (the training split unless asked otherwise, so no test record reaches training by
default; records without a `split` field are kept and counted), duplicates removed (the
same media with the same question and answer, within and across files), each file sampled
to its ratio with the same rule training uses, and the modality / task / dataset
distribution reported as a table, JSON and a bar chart (OmniV-Med's Fig. 2)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..data.files import atomic_write, output_folder, write_text_atomic
from ..data.mixture import (
    MixtureError,
    draw,
    entry_records,
    in_splits,
    mixture_splits,
    read_spec,
    sample_counts,
)
from ..data.records import Record
from ..extras import CHART_MODULE, installed
from ..models.kinds import VisualKind

_LIST_KEY = {VisualKind.IMAGE: "images", VisualKind.VIDEO: "videos", VisualKind.VOLUME: "volumes"}


def _question(record: Record) -> str:
    return next(
        (
            t["value"]
            for t in record.conversations
            if t.get("from", t.get("role")) in ("human", "user")
        ),
        "",
    )


def _key(record: Record) -> str:
    media = [str(path) for _, path, _ in record.media]
    text = " ".join(_question(record).lower().split()) + "\x00" + str(record.meta.get("answer", ""))
    return hashlib.sha256(json.dumps([media, text]).encode()).hexdigest()


def _raw(record: Record, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"id": record.id}
    for kind, path, options in record.media:
        rel = os.path.relpath(path, root)
        out.setdefault(_LIST_KEY[kind], []).append({"path": rel, **options} if options else rel)
    out["conversations"] = record.conversations
    out.update(record.meta)
    return out


def build_mix(
    yaml_path: str | Path, out_dir: str | Path, splits: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The mixture of `yaml_path`'s files, drawn from the records of `splits` only (default:
    the mixture's own `splits`, which default to the training split, as in training)."""
    yaml_path, out_dir = Path(yaml_path), output_folder(out_dir)
    if splits is not None and not splits:
        raise MixtureError("at least one split must be chosen")
    spec, entries = read_spec(yaml_path)
    splits = splits or mixture_splits(yaml_path, spec)
    seen: set[str] = set()
    sources, pools, ratios = [], [], []
    for k, entry in enumerate(entries):
        everything = entry_records(yaml_path, k, entry)
        records, left_out = in_splits(everything, splits)
        path = yaml_path.parent / entry["path"]
        kept = []
        for r in records:
            key = _key(r)
            if key not in seen:
                seen.add(key)
                kept.append(r)
        ratio = float(entry.get("ratio", 1.0))
        if ratio < 0:
            raise MixtureError(f"{yaml_path}: datasets[{k}]: ratio must be >= 0, got {ratio}")
        if ratio > 0 and not records:
            raise MixtureError(f"{path}: no records of splits {list(splits)} (it holds "
                               f"{left_out}); choose others with --splits")  # fmt: skip
        sources.append({
            "path": str(path), "records": len(records), "duplicates": len(records) - len(kept),
            "left_out_by_split": left_out,
            "without_split": sum(1 for r in records if r.meta.get("split") is None),
        })  # fmt: skip
        pools.append(kept)
        ratios.append(ratio)
    if sum(ratios) <= 0:
        raise MixtureError(f"{yaml_path}: the ratios must have a positive sum")
    total = int(spec.get("num_samples") or sum(len(p) for p in pools))
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    drawn: list[Record] = []
    for source, pool, count in zip(sources, pools, sample_counts(ratios, total), strict=True):
        if count and not pool:
            others = (
                f"; it holds {source['left_out_by_split']}" if source["left_out_by_split"] else ""
            )
            raise MixtureError(f"{source['path']}: no records of splits {list(splits)} left but its "
                               f"ratio asks for {count}{others}")  # fmt: skip
        picks = draw(rng, len(pool), int(count))
        source.update(drawn=int(count), upsampled=bool(count > len(pool)))
        # Ids stay unique when a file is drawn more than once.
        seen_ids: Counter = Counter()
        for i in picks:
            r = pool[i]
            seen_ids[r.id] += 1
            if seen_ids[r.id] > 1:
                r = Record(f"{r.id}#{seen_ids[r.id]}", r.conversations, r.media, r.meta, r.sources)
            drawn.append(r)
    drawn = [drawn[i] for i in rng.permutation(len(drawn))]
    media_paths = [str(Path(p).resolve()) for r in drawn for _, p, _ in r.media]
    root = Path(os.path.commonpath(media_paths)) if media_paths else out_dir.resolve()
    if media_paths and Path(media_paths[0]) == root:  # a single file: its folder is the root
        root = root.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "mixture.jsonl"
    with atomic_write(out) as f:
        for r in drawn:
            f.write(json.dumps(_raw(r, root), ensure_ascii=False) + "\n")

    def dist(key: str) -> dict[str, int]:
        return dict(Counter(str(r.meta.get(key) or "unknown") for r in drawn).most_common())

    left_out = Counter()
    for source in sources:
        left_out.update(source["left_out_by_split"])
    summary = {"output": str(out), "data_root": str(root), "records": len(drawn),
               "splits": list(splits), "left_out_by_split": dict(sorted(left_out.items())),
               "without_split": sum(s["without_split"] for s in sources), "sources": sources,
               "modality": dist("modality"), "task": dist("question_type"), "dataset": dist("dataset"),
               "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}  # fmt: skip
    write_text_atomic(
        out_dir / "mixture.summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    )
    _plot(summary, out_dir / "distribution.png")
    return summary


def _plot(summary: dict[str, Any], path: Path) -> None:
    if not installed(CHART_MODULE):  # the summary and the table say it all
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("modality", "task"), strict=True):
        items = list(summary[key].items())[:20]
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4a7ab5")
        ax.set_title(f"samples per {key} ({summary['records']} in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
