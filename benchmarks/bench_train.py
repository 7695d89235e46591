"""Training throughput on the demo mixture: stage 3 (images, volumes and videos) with
pruning at 0.1 vs without, same data, same steps.

    python benchmarks/bench_train.py [--steps 20] [--workers 0,2]
    python benchmarks/bench_train.py --memory omnivmed-1.5b-shape   # GPU: memory per GPU

Reports samples/s, volumes+videos per second, text tokens per second, the fraction of
step time spent waiting for the next batch (data_wait_fraction) and peak memory (CPU RSS,
or GPU memory on a GPU), for each number of DataLoader workers given (the same samples in
the same order each time). Stage 3 trains every parameter.

--memory PRESET: peak GPU memory per GPU of stage 3 (everything trained, bf16, ZeRO-2,
gradient checkpointing on and off) for a full-size preset; the *-shape presets have the
released architectures with random weights, so no checkpoint is needed. Run it under the
deepspeed launcher to measure with N GPUs (ZeRO-2 splits optimizer state and gradients).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from _timing import print_table, write_results

from omnivmed.configs import packaged_config
from omnivmed.demo import DEMO_MEDIA_SETTINGS, build_demo_dataset
from omnivmed.training.config import load_stage_config
from omnivmed.training.trainer import loader_workers, train_stage


def run(data: Path, out: Path, prune: bool, steps: int, media=None, **overrides) -> dict:
    """Stage 3 for `steps` steps on `data` (the demo's media settings unless `media`)."""
    settings = {"init": "preset:tiny", **overrides}
    media = (media or DEMO_MEDIA_SETTINGS[3]).replace(prune=prune)
    cfg = load_stage_config(packaged_config("stage3"), data=str(data), output_dir=str(out), name="stage3",
                            media=media, max_steps=steps, save_every=0, checkpoint_at_end=False,
                            **settings)  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_stage(cfg, resume=False)
    elapsed = time.perf_counter() - start
    # Rates come from the optimizer steps' own times (data loading included), leaving out
    # the first step (allocator and kernel warm-up) when there are more, and set-up and
    # the export at the end.
    steps_log = [json.loads(x) for x in (out / "samples_rank0.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = slice(1, None) if len(metrics) > 1 else slice(None)
    timed_steps = {m["step"] for m in metrics[timed]}
    wait_seconds = sum(m["data_wait_fraction"] * m["step_seconds"] for m in metrics[timed])
    ids = [s for r in steps_log if r["step"] in timed_steps for s in r["samples"]]
    train_seconds = sum(m["step_seconds"] for m in metrics[timed])
    volumes_videos = sum(1 for s in ids if s.startswith(("s3-mri", "s3-ct", "s3-endoscopy")))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    row = {"prune": prune, "steps": steps, "seconds": elapsed, "timed_steps": len(timed_steps),
           "train_seconds": train_seconds, "samples_per_s": len(ids) / train_seconds,
           "volumes_videos_per_s": volumes_videos / train_seconds,
           **{f"{kind}_tokens_per_s": sum(m[key] for m in metrics[timed]) / len(metrics[timed])
              for kind, key in (("llm", "tokens_per_s"), ("visual", "visual_tokens_per_s"),
                                ("tower", "tower_tokens_per_s"))},
           "num_workers": loader_workers(cfg.num_workers), "packing": cfg.packing,
           "data_wait_fraction": wait_seconds / train_seconds,
           "peak_memory_mib": peak}  # fmt: skip
    row["text_tokens_per_s"] = row["llm_tokens_per_s"] - row["visual_tokens_per_s"]
    if torch.cuda.is_available():
        row["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        row["world_size"] = torch.distributed.get_world_size()
    return row


def memory(
    preset: str, steps: int, data: Path, tmp: Path, media=None, offload: bool = False
) -> list[dict]:
    """Peak memory of stage 3 with gradient checkpointing on and off (and, with
    `offload`, the optimizer offloaded to the CPU with checkpointing on)."""
    rows = []
    variants = [(True, False), (False, False)] + ([(True, True)] if offload else [])
    for checkpointing, to_cpu in variants:
        row = run(data, tmp / f"mem{checkpointing}{to_cpu}", True, steps, media, init=f"preset:{preset}",
                  gradient_checkpointing=checkpointing, zero_stage=2, offload=to_cpu)  # fmt: skip
        rows.append(
            {"preset": preset, "gradient_checkpointing": checkpointing, "offload": to_cpu, **row}
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    parser.add_argument("--memory", metavar="PRESET", help="peak GPU memory of a full-size preset")
    args = parser.parse_args(argv)
    if args.memory:
        if not torch.cuda.is_available():
            raise SystemExit("--memory measures GPU memory: it needs a CUDA device")
        with tempfile.TemporaryDirectory() as tmp:
            paths = build_demo_dataset(Path(tmp) / "data")
            rows = memory(args.memory, min(args.steps, 5), paths["stage3"], Path(tmp))
        print_table(rows, [("preset", "preset", ""), ("gradient_checkpointing", "ckpt", ""),
                           ("world_size", "GPUs", "d"), ("peak_memory_mib", "peak MiB", ".0f"),
                           ("peak_reserved_mib", "reserved MiB", ".0f"),
                           ("samples_per_s", "samples/s", ".2f")])  # fmt: skip
        if not args.no_save and torch.distributed.get_rank() == 0:
            print(
                f"wrote {write_results(f'train_memory_{args.memory}', torch.device('cuda'), rows)}"
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_demo_dataset(Path(tmp) / "data")
        workers = [int(w) for w in args.workers.split(",")]
        rows = [run(paths["stage3"], Path(tmp) / f"run{p}{w}", p, args.steps, num_workers=w)
                for w in workers for p in (False, True)]  # fmt: skip
    for w in workers:
        off, on = (r for r in rows if r["num_workers"] == w)
        on["speedup_volumes_videos"] = on["volumes_videos_per_s"] / off["volumes_videos_per_s"]
        print(
            f"{w} workers: volumes+videos per second, pruning on / off: {on['speedup_volumes_videos']:.2f}x"
        )
    print_table(rows, [("num_workers", "workers", "d"), ("prune", "prune", ""), ("samples_per_s", "samples/s", ".2f"),
                       ("volumes_videos_per_s", "vol+video/s", ".2f"), ("text_tokens_per_s", "text tok/s", ".0f"),
                       ("data_wait_fraction", "data wait", ".1%"), ("peak_memory_mib", "peak MiB", ".0f")])  # fmt: skip
    if not args.no_save:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"wrote {write_results('train', device, rows)}")


if __name__ == "__main__":
    main()
