"""Benchmark of l1_prune and l1_prune_padded against three PyTorch baselines and the floor.

Baselines, measured in the same run on the same inputs:

- loop: `omnivmed_ext.reference.l1_prune_reference`, item by item and frame by frame in
  eager PyTorch (what a first implementation looks like);
- vectorized: all frames at once in eager PyTorch (differences to the previous frame,
  the first frame of each item kept whole, then a boolean gather);
- compile: `torch.compile` of the vectorized version;
- floor: a copy that moves the bytes the op must move: read every patch value once and
  write the kept values once. The op cannot be faster than this.

Shapes: 4 items x 32 frames of 448x448x3 in 14x14 patches (fp32, bf16, uint8), and the
MNI152 template's 32 slices as the processor prepares them. On CUDA the padded path is
checked for host synchronisations (there must be none) with torch's sync debug mode.

    python benchmarks/bench_l1_prune.py                 # CPU
    python benchmarks/bench_l1_prune.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _timing import mni_template_path, print_table, time_call, write_results

import omnivmed_ext
from omnivmed_ext.reference import l1_prune_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
# Normalised inputs ([-1, 1]) prune at 0.1; uint8 ones in 0..255 units, the same scale.
THRESHOLDS = {"fp32": 0.1, "bf16": 0.1, "uint8": 0.1 * 127.5}


def clip_like(items: int, frames: int, grid: int, values: int, dtype: str, device) -> torch.Tensor:
    """Video-like patches `[items * frames, grid*grid, values]`: a still background with
    faint noise (pruned) and a bright square that moves a patch per frame (kept)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(items, 1, grid * grid, values, generator=g) * 2 - 1
    noise = (torch.rand(items, frames, grid * grid, values, generator=g) - 0.5) * 0.02
    x = (base + noise).clone()
    for f in range(frames):
        rows = [(f + r) % grid for r in range(grid // 4)]
        cells = torch.tensor([r * grid + c for r in rows for c in range(grid // 4)])
        x[:, f, cells] = 0.9
    x = x.reshape(items * frames, grid * grid, values)
    if dtype == "uint8":
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(device)
    return x.to(device=device, dtype=DTYPES[dtype])


def mni_slices(device) -> tuple[torch.Tensor, tuple[int, int]]:
    """The MNI152 template's 32 slices at the presets' 448x448 budget, as the processor
    prepares them (SigLIP-normalised, 14x14 patches)."""
    from omnivmed.models import VisualKind, build_preset
    from omnivmed.processing import patchify
    from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions

    path = mni_template_path()
    with torch.device("meta"):
        model, tokenizer = build_preset("omnivmed-1.5b-shape")
    processor = OmniVMedProcessor(model.config, tokenizer, ProcessorOptions(max_slices=32))
    frames = processor.load(Media(VisualKind.VOLUME, path)).frames
    grid = (frames.shape[-2] // 14, frames.shape[-1] // 14)
    return patchify(frames, 14).to(device).contiguous(), grid


def prune_vectorized(patches, cu_frames, grid, threshold):
    """All frames at once, eager PyTorch (mode "previous", unit 1)."""
    frames, n, p = patches.shape
    x = patches.float()
    distance = torch.zeros(frames, n, device=patches.device)
    distance[1:] = (x[1:] - x[:-1]).abs().mean(-1)
    first = torch.zeros(frames, dtype=torch.bool, device=patches.device)
    first[cu_frames[:-1].long()] = True
    keep = (distance >= threshold) | first[:, None]
    index = keep.reshape(-1).nonzero().squeeze(1)
    values = patches.reshape(-1, p).index_select(0, index)
    item = torch.bucketize(
        torch.arange(frames, device=patches.device), cu_frames[1:].long(), right=True
    )
    frame = index // n
    t = frame - cu_frames.long()[item[frame]]
    positions = torch.stack((t, (index % n) // grid[1], index % grid[1]), 1).to(torch.int32)
    return keep, index, positions, values


def count_syncs(fn) -> int:
    """Host synchronisations `fn` makes on CUDA (torch's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the per-call warnings count: the first switch into the debug mode also warns
    # that the mode is a prototype, and that warning is no synchronisation.
    return sum("called a synchronizing" in str(w.message) for w in caught)


def bench(name, patches, cu, grid, dtype, device, args) -> dict:
    threshold = THRESHOLDS[dtype]
    timing = dict(warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds)
    kept = omnivmed_ext.l1_prune(patches, cu, grid, threshold)
    count = int(kept.index.numel())
    ref = l1_prune_reference(patches, cu, grid, threshold)
    vec = prune_vectorized(patches, cu, grid, threshold)
    row = {
        "input": name, "dtype": dtype, "frames": patches.shape[0], "patches": patches.shape[1],
        "values": patches.shape[2], "kept_fraction": count / (patches.shape[0] * patches.shape[1]),
        "matches_reference": bool(torch.equal(kept.keep, ref.keep)),
        "vectorized_matches": bool(torch.equal(kept.keep, vec[0])),
    }  # fmt: skip
    row["op_ms"] = time_call(
        lambda i: omnivmed_ext.l1_prune(patches, cu, grid, threshold), device, **timing
    )["median_ms"]
    row["padded_ms"] = time_call(
        lambda i: omnivmed_ext.l1_prune_padded(patches, cu, grid, threshold), device, **timing
    )["median_ms"]
    slow = dict(timing, iters=max(3, args.iters // 10), warmup=1)
    row["loop_ms"] = time_call(
        lambda i: l1_prune_reference(patches, cu, grid, threshold), device, **slow
    )["median_ms"]
    row["vectorized_ms"] = time_call(
        lambda i: prune_vectorized(patches, cu, grid, threshold), device, **timing
    )["median_ms"]
    if not args.no_compile:
        compiled = torch.compile(prune_vectorized)
        row["compile_ms"] = time_call(
            lambda i: compiled(patches, cu, grid, threshold), device, **timing
        )["median_ms"]
    # The floor: read all values once, write the kept ones once.
    moved = (
        patches.numel() * patches.element_size() + count * patches.shape[2] * patches.element_size()
    )
    src = torch.empty(moved // 2 // patches.element_size(), dtype=patches.dtype, device=device)
    dst = torch.empty_like(src)
    row["floor_ms"] = time_call(lambda i: dst.copy_(src), device, **timing)["median_ms"]
    row["op_GBps"] = moved / row["op_ms"] / 1e6
    row["floor_GBps"] = moved / row["floor_ms"] / 1e6
    row["op_over_floor"] = row["op_ms"] / row["floor_ms"]
    for base in ("loop", "vectorized", "compile"):
        if f"{base}_ms" in row:
            row[f"x_{base}"] = row[f"{base}_ms"] / row["op_ms"]
    if device.type == "cuda":
        row["padded_host_syncs"] = count_syncs(
            lambda: omnivmed_ext.l1_prune_padded(patches, cu, grid, threshold)
        )
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs (default 20 CPU, 100 CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fp32 clip and the MNI slices only")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.iters = args.iters or (20 if device.type == "cpu" else 100)
    args.warmup = args.warmup or (3 if device.type == "cpu" else 20)
    items, frames, grid, values = 4, 32, 32, 3 * 14 * 14
    cu = torch.arange(0, items * frames + 1, frames, dtype=torch.int32, device=device)
    rows = []
    for dtype in ("fp32",) if args.quick else ("fp32", "bf16", "uint8"):
        patches = clip_like(items, frames, grid, values, dtype, device)
        rows.append(bench("4x32 frames 448x448", patches, cu, (grid, grid), dtype, device, args))
        print(f"done {dtype}", flush=True)
        del patches
    mni, mni_grid = mni_slices(device)
    mni_cu = torch.tensor([0, mni.shape[0]], dtype=torch.int32, device=device)
    rows.append(bench("MNI152 32 slices", mni, mni_cu, mni_grid, "fp32", device, args))
    columns = [
        ("input", "input", "s"), ("dtype", "dtype", "s"), ("kept_fraction", "kept", ".2f"),
        ("op_ms", "op ms", ".2f"), ("padded_ms", "padded ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
        ("op_over_floor", "op/floor", ".2f"), ("x_loop", "x loop", ".1f"),
        ("x_vectorized", "x vectorized", ".2f"), ("x_compile", "x compile", ".2f"),
        ("op_GBps", "op GB/s", ".1f"), ("floor_GBps", "floor GB/s", ".1f"),
        ("padded_host_syncs", "syncs", "d"), ("matches_reference", "= ref", ""),
    ]  # fmt: skip
    print_table(rows, columns)
    if not args.no_save:
        path = write_results("l1_prune", device, rows, {"baselines": {
            "loop": "omnivmed_ext.reference.l1_prune_reference (eager, item by item, frame by frame)",
            "vectorized": "prune_vectorized here (eager PyTorch, all frames at once)",
            "compile": "torch.compile(prune_vectorized)",
            "floor": "Tensor.copy_ of (input bytes + kept bytes) / 2: read input once, write kept values once",
        }})  # fmt: skip
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
