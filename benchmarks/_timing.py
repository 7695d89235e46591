"""Timing and reporting shared by the benchmarks.

Times are medians of many timed runs after warm-up: CUDA events on a GPU, a monotonic
clock around synchronous calls on the CPU. Inputs rotate among several copies so that a
GPU's L2 cache does not flatter memory-bound kernels. Results go to a JSON file with the
device, the versions and the date, so numbers can be compared across machines honestly.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(
    fn: Callable[[int], Any],
    device: torch.device,
    *,
    warmup: int = 10,
    iters: int = 50,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median/min/max milliseconds of `fn(i)` (i picks the input copy), after warm-up."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_evt = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        end_evt = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            start_evt[i].record()
            fn(i)
            end_evt[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(start_evt, end_evt, strict=True)]
    else:
        deadline = time.perf_counter() + min_seconds
        i = 0
        while i < iters or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
    }


def environment(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit = ""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["device"] = f"CPU ({info['cpu']}, {info['cpu_threads']} threads)"
    return info


def write_results(
    name: str, device: torch.device, rows: Sequence[dict], extra: dict | None = None
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    tag = "cpu" if device.type == "cpu" else env["device"].lower().replace(" ", "-")
    path = RESULTS_DIR / f"{name}_{tag}.json"
    path.write_text(
        json.dumps(
            {"benchmark": name, "environment": env, **(extra or {}), "rows": list(rows)}, indent=2
        )
        + "\n"
    )
    return path


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    headers = [h for _, h, _ in columns]
    cells = [
        [format(r.get(k, float("nan")), f) if r.get(k) is not None else "-" for k, _, f in columns]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def mni_template_path() -> Path:
    """The MNI152 T1 template: nilearn's copy, or the one inside the demo data carried to
    a GPU machine without nilearn (gpu_wheels/demo_data, see scripts/fetch_gpu_wheels.sh)."""
    try:
        import nilearn.datasets

        return (Path(nilearn.datasets.__file__).parent / "data"
                / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")  # fmt: skip
    except ImportError:
        return Path(__file__).resolve().parent.parent / "gpu_wheels/demo_data/media/mni_t1.nii.gz"
