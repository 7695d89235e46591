"""Visual tokens at dataset scale, with and without pruning (OmniV-Med's Fig. 6): the
processor runs over every sample, and each item's kept and unpruned token counts (same
frames, same pixel budget) are summed per modality."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..data.records import Record
from ..extras import CHART_MODULE, installed
from ..processing.processor import Media, OmniVMedProcessor


@dataclass
class ModalityTokens:
    modality: str
    items: int = 0
    pruned: int = 0
    unpruned: int = 0

    @property
    def reduction(self) -> float:
        """Fraction of visual tokens pruning removes."""
        return 1.0 - self.pruned / self.unpruned if self.unpruned else 0.0


def modality_of(record: Record, kind_name: str, multi: bool) -> str:
    """The record's own `modality` field when it has one (for a one-medium sample), else
    the medium's kind."""
    modality = record.meta.get("modality")
    return str(modality) if modality and not multi else kind_name


def token_statistics(
    records: list[Record], processor: OmniVMedProcessor, skip_errors: bool = True
) -> tuple[list[ModalityTokens], list[tuple[str, str]]]:
    """Per-modality totals, and (id, why) of each sample that could not be read, when
    skipped."""
    totals: dict[str, ModalityTokens] = {}
    failed: list[tuple[str, str]] = []
    for record in tqdm(records, desc="visual tokens", unit="sample"):
        if not record.media:
            continue
        media = [Media(kind, path, options) for kind, path, options in record.media]
        try:
            visual = processor.encode_media(media, record.id, prune=True)
        except ValueError as exc:
            if not skip_errors:
                raise
            failed.append((record.id, str(exc)))
            continue
        for (kind, _, _), kept, full in zip(
            record.media, visual.token_counts, visual.unpruned_counts, strict=True
        ):
            name = modality_of(record, kind.name.lower(), len(record.media) > 1)
            entry = totals.setdefault(name, ModalityTokens(name))
            entry.items += 1
            entry.pruned += kept
            entry.unpruned += full
    rows = sorted(totals.values(), key=lambda r: r.modality)
    return rows, failed


def write_report(rows: list[ModalityTokens], out_dir: Path, title: str) -> tuple[Path, Path | None]:
    """`token_stats.json` and `token_stats.png` (a bar chart: tokens per item, pruned vs
    not) in `out_dir`; the chart is None where matplotlib is not installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [{**asdict(r), "reduction": r.reduction} for r in rows]
    json_path = out_dir / "token_stats.json"
    json_path.write_text(json.dumps({"title": title, "modalities": data}, indent=2) + "\n")
    if not installed(CHART_MODULE):
        return json_path, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_item = defaultdict(list)
    for r in rows:
        per_item["unpruned"].append(r.unpruned / max(r.items, 1))
        per_item["pruned"].append(r.pruned / max(r.items, 1))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], per_item["unpruned"], width=0.4, label="without pruning")
    ax.bar([x + 0.2 for x in xs], per_item["pruned"], width=0.4, label="with pruning")
    for x, r in zip(xs, rows, strict=True):
        ax.text(
            x + 0.2,
            per_item["pruned"][x],
            f"-{100 * r.reduction:.0f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), [r.modality for r in rows])
    ax.set_ylabel("visual tokens per item")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = out_dir / "token_stats.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
