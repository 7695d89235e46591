"""Checkpoints written atomically and verified before they are read.

DeepSpeed saves under a temporary tag; every rank adds its RNG state (safetensors + JSON,
no pickle); rank 0 then writes `manifest.json` (every file's size and SHA-256, the run's
id) last, atomically, renames the folder to `step-N` and updates `latest`. A folder counts
as a checkpoint only with its manifest; before resuming, the files are checked against it
and the run id against the output folder's `run.json`, so DeepSpeed (which unpickles its
own state files) only ever reads files this run wrote. A crash mid-save leaves a `tmp-*`
folder, which resume ignores and the next save removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import barrier
from ..run_folder import RUN_FILE

MANIFEST = "manifest.json"
LOCK_FILE = ".omnivmed.lock"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be trusted or read."""


# ---- RNG state without pickles ----------------------------------------------------------
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


def save_rng_state(path: Path, state: dict[str, Any]) -> None:
    """Tensors in safetensors, Python's and NumPy's scalars as JSON metadata."""
    from safetensors.torch import save_file

    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if state.get("cuda") is not None:
        tensors["cuda"] = state["cuda"].cpu()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}  # fmt: skip
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    version, internal, gauss = json.loads(meta["python"])
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    return {"python": (version, tuple(internal), gauss), "numpy": (name, keys, pos, has_gauss, cached),
            "torch": tensors["torch"], "cuda": tensors.get("cuda")}  # fmt: skip


# ---- run identity and the folder lock ---------------------------------------------------
def run_id(out_dir: Path, create: bool) -> str:
    """The id of the run that owns `out_dir` (made by rank 0 on a fresh folder)."""
    path = out_dir / RUN_FILE
    if create and not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": uuid.uuid4().hex, "created": time.time()}))
        os.replace(tmp, path)
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable run file ({exc})") from exc


# Descriptors of the output locks this process holds. A forked child (a DataLoader worker)
# closes its copies at once: an flock belongs to the open file, so a child outliving a
# killed run would otherwise keep the folder locked against the resume.
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class OutputLock:
    """An exclusive lock on an output folder for the life of a run, so a second run
    pointed at the same folder stops at once instead of interleaving with the first."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                "finish or give this run its own output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        _held_lock_fds.add(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            _held_lock_fds.discard(self._fd)
            os.close(self._fd)  # closing releases the lock
            self._fd = None


# ---- manifests --------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, run: str, step: int) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}  # fmt: skip
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"run_id": run, "step": step, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: Path, run: str) -> None:
    """Raise unless every file of `folder` is exactly one its manifest lists, written by
    the run `run`."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable manifest ({exc})") from exc
    if manifest.get("run_id") != run:
        raise CheckpointError(
            f"{folder} was written by run {manifest.get('run_id')!r}, not by the run that owns "
            f"this output folder ({run!r}); a checkpoint from elsewhere is never loaded"
        )
    present = {str(p.relative_to(folder)): p for p in _files(folder)}
    extra = sorted(set(present) - set(files))
    missing = sorted(set(files) - set(present))
    if extra or missing:
        raise CheckpointError(
            f"{folder}: files differ from its manifest (not listed: {extra}, absent: {missing})"
        )
    for name, p in present.items():
        want = files[name]
        if p.stat().st_size != want.get("bytes") or _sha256(p) != want.get("sha256"):
            raise CheckpointError(
                f"{p}: size or SHA-256 differs from the manifest; the checkpoint was changed "
                "after it was written"
            )


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """`step-N` folders that carry a manifest (a folder's name alone proves nothing)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        named = d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()
        if named and (d / MANIFEST).is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def save_checkpoint(
    engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int,
    run: str,
) -> Path:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    tmp_tag, final = f"tmp-{step}", root / f"step-{step}"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    # Every rank's own generators (DeepSpeed keeps client_state from rank 0 only). The folder
    # is shared storage in a multi-node run.
    save_rng_state(root / tmp_tag / f"rng_rank{rank}.safetensors", rng_state())
    barrier()
    if rank == 0:
        write_manifest(root / tmp_tag, run, step)  # last: it makes the folder a checkpoint
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


def load_latest(engine, root: Path, run: str, rank: int = 0) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint, after checking it against its manifest;
    None when there is none. The returned client state carries this rank's RNG state
    under "rng"."""
    found = complete_checkpoints(root)
    if not found:
        return None
    _, path = found[-1]
    verify_checkpoint(path, run)
    _, client = engine.load_checkpoint(str(root), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)  # fmt: skip
    if client is None:
        raise CheckpointError(f"checkpoint {path} could not be loaded")
    rng_file = path / f"rng_rank{rank}.safetensors"
    if not rng_file.is_file():
        raise CheckpointError(
            f"checkpoint {path} lacks {rng_file.name}: was it written by a different number of ranks?"
        )
    client["rng"] = load_rng_state(rng_file)
    return client
