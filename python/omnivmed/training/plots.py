"""A PNG of the loss curves of all stages, one after another."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metric_files: list[Path], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for path in metric_files:
        by_step: dict[int, dict] = {}
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = record  # after a resume, the latest record of a step wins
        steps = sorted(by_step)
        if not steps:
            continue
        ax.plot(
            [offset + s for s in steps],
            [by_step[s]["loss"] for s in steps],
            label=by_step[steps[0]]["stage"],
        )
        offset += steps[-1]
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
