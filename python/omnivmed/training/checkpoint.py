"""Checkpoints written atomically: DeepSpeed saves under a temporary tag, then rank 0
renames it to `step-N` and updates `latest` with an atomic replace. A crash mid-save
leaves only a `tmp-*` folder, which resume ignores and the next save removes."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import barrier


def rng_state() -> dict[str, Any]:
    """This rank's generators (the current CUDA device only)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def save_checkpoint(
    engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp_tag, final = f"tmp-{step}", root / f"step-{step}"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    # Every rank's own generators (DeepSpeed keeps client_state from rank 0 only). The folder
    # is shared storage in a multi-node run.
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def load_latest(engine, root: Path, rank: int = 0) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint; None when there is none. The returned client
    state carries this rank's RNG state under "rng"."""
    found = complete_checkpoints(root)
    if not found:
        return None
    _, path = found[-1]
    _, client = engine.load_checkpoint(str(root), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)  # fmt: skip
    if client is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded")
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise RuntimeError(
            f"checkpoint {path} lacks {rng_file.name}: was it written by a different number of ranks?"
        )
    client["rng"] = torch.load(rng_file, weights_only=False)
    return client
