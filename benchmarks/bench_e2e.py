"""The whole stack on one device, in one run: what pruning buys and what training costs.

1. tower: the vision tower alone (SigLIP so400m shape, 27 layers), forward + backward on
   the MNI152 template's 32 slices at the 448x448 budget, pruned at 0.1 vs unpruned.
2. train: stage 3 on the demo mixture (images, the MNI volume, the CT series, the
   endoscopy videos) at the 1.5B shape and the presets' media settings, pruning on vs off:
   samples/s, volumes+videos/s, LLM tokens/s and model FLOPs utilisation (6 x LLM
   parameters x LLM tokens per second, against a bf16 matmul measured in the same run).
3. memory: peak memory per GPU of stage 3 at the 1.5B shape (ZeRO-2, everything trained,
   gradient checkpointing on and off, the optimizer offloaded), and the per-GPU peak for
   8 GPUs computed from the measured parts (see `per_gpu_for`).
4. l1_prune: bench_l1_prune's inputs (quick set).
5. infer: latency of one question about an image, a volume and a video, pruning on and
   off, for a saved tiny model and for the 1.5B shape (random weights).

Every part writes JSON and a log under --out, and a failing part is reported without
stopping the others; a summary table comes last. `--smoke` runs the same code on the CPU
with the tiny preset and small budgets, in about two minutes.

    python benchmarks/bench_e2e.py --out gpu_out/e2e            # on a GPU
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e       # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _timing import environment, mni_template_path, time_call

from omnivmed.models import VisualKind, build_preset
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions

PRESETS_MEDIA = ProcessorOptions(max_pixels=448 * 448, max_slices=32, max_video_frames=32)


def settings(smoke: bool) -> dict:
    if smoke:
        media = ProcessorOptions(
            max_pixels=112 * 112, min_pixels=32 * 32, max_slices=16, video_fps=4.0
        )
        return dict(preset="tiny", media=media, steps=3, tower_slices=8, device=torch.device("cpu"),
                    dtype=torch.float32, memory=False)  # fmt: skip
    return dict(preset="omnivmed-1.5b-shape", media=PRESETS_MEDIA, steps=10, tower_slices=32,
                device=torch.device("cuda"), dtype=torch.bfloat16, memory=True)  # fmt: skip


# ---- 1. the vision tower alone -----------------------------------------------------------
def bench_tower(cfg: dict, out: Path) -> dict:
    from omnivmed.processing import pack_visual_items

    with torch.device("meta"):
        shape_model, tok = build_preset(cfg["preset"])
    tower_cls = type(shape_model.vision_tower)
    tower = tower_cls(shape_model.config.vision_config).to(cfg["device"], cfg["dtype"])
    media = cfg["media"].replace(max_slices=cfg["tower_slices"])
    processor = OmniVMedProcessor(shape_model.config, tok, media)
    item = processor.load(Media(VisualKind.VOLUME, mni_template_path()))
    import omnivmed_ext

    # On a GPU both CUDA backends of rope_attention are timed; the CPU has one path.
    backends = omnivmed_ext.attention.CUDA_BACKENDS if cfg["device"].type == "cuda" else (None,)
    row = {}
    for backend in backends:
        for prune in (False, True):
            batch = pack_visual_items([item], shape_model.config, media, prune=prune)
            x = batch.pixel_values.to(cfg["device"], cfg["dtype"])
            pos = batch.visual_positions.to(cfg["device"])
            cu = batch.visual_cu_seqlens.to(cfg["device"])

            def step(_, x=x, pos=pos, cu=cu):
                tower.zero_grad(set_to_none=True)
                tower(x, pos, cu).float().square().mean().backward()

            chosen = (
                omnivmed_ext.attention.use_cuda_backend(backend)
                if backend
                else contextlib.nullcontext()
            )
            with chosen:
                timing = time_call(
                    step, cfg["device"], warmup=2, iters=5 if cfg["device"].type == "cpu" else 10
                )
            key = ("pruned" if prune else "unpruned") + (f"_{backend}" if backend else "")
            row[f"{key}_tokens"] = int(x.shape[0])
            row[f"{key}_ms"] = timing["median_ms"]
            row[f"{key}_tokens_per_s"] = x.shape[0] / timing["median_ms"] * 1e3
    # The headline ratio uses the package's default backend.
    default = f"_{omnivmed_ext.attention.cuda_backend()}" if backends[0] else ""
    for key in ("tokens", "ms"):
        for kind in ("pruned", "unpruned"):
            row[f"{kind}_{key}"] = row[f"{kind}{default}_{key}"]
    row["time_ratio"] = row["pruned_ms"] / row["unpruned_ms"]
    row["token_ratio"] = row["pruned_tokens"] / row["unpruned_tokens"]
    if backends[0]:
        for kind in ("pruned", "unpruned"):
            row[f"{kind}_fused_vs_composite"] = (
                row[f"{kind}_composite_ms"] / row[f"{kind}_fused_ms"]
            )
    return row


# ---- 2. and 3. training ------------------------------------------------------------------
def matmul_peak_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    ms = time_call(lambda _: a @ b, device, warmup=3, iters=10)["median_ms"]
    return 2 * n**3 / ms / 1e9


def bench_train(cfg: dict, data: Path, out: Path) -> dict:
    from bench_train import run

    with torch.device("meta"):
        shape_model, _ = build_preset(cfg["preset"])
    llm_params = sum(p.numel() for p in shape_model.language_model.parameters())
    peak = matmul_peak_tflops(cfg["device"], cfg["dtype"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prune in (False, True):
            r = run(
                data,
                Path(tmp) / f"p{prune}",
                prune,
                cfg["steps"],
                cfg["media"],
                init=f"preset:{cfg['preset']}",
            )
            r["mfu_llm"] = 6 * llm_params * r["text_tokens_per_s"] / (peak * 1e12)
            rows["on" if prune else "off"] = r
    return {"matmul_peak_tflops": peak, "llm_params": llm_params, "pruning_off": rows["off"],
            "pruning_on": rows["on"],
            "speedup_volumes_videos": rows["on"]["volumes_videos_per_s"] / rows["off"]["volumes_videos_per_s"]}  # fmt: skip


def per_gpu_for(world: int, peak_mib: float, params: int) -> float:
    """ZeRO-2 over `world` GPUs from a world-size-1 peak: bf16 weights (2 bytes/param)
    stay whole; bf16 gradients (2) and the fp32 master weights + Adam moments (12) are
    split `world` ways; activations and workspace (the rest of the peak) stay."""
    split = 14 * params / 2**20
    return peak_mib - split + split / world


def bench_memory(cfg: dict, data: Path, out: Path) -> dict:
    from bench_train import memory

    with torch.device("meta"):
        shape_model, _ = build_preset(cfg["preset"])
    params = sum(p.numel() for p in shape_model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        rows = memory(cfg["preset"], 3, data, Path(tmp), cfg["media"], offload=True)
    for r in rows:
        r["per_gpu_8_mib"] = (
            per_gpu_for(8, r["peak_memory_mib"], params) if not r["offload"] else None
        )
    return {"params": params, "rows": rows}


# ---- 4. l1_prune ---------------------------------------------------------------------------
def bench_prune(cfg: dict, out: Path) -> dict:
    import bench_l1_prune

    args = [
        "--quick",
        "--no-save",
        "--device",
        cfg["device"].type,
        "--iters",
        "5" if cfg["device"].type == "cpu" else "50",
    ]
    if cfg["device"].type == "cpu":
        args.append("--no-compile")
    rows = bench_l1_prune.main(args)
    return {"rows": rows}


# ---- 5. inference --------------------------------------------------------------------------
def bench_infer(cfg: dict, data: Path, out: Path) -> dict:
    from omnivmed.inference import answer_questions, load_for_inference

    media_dir = data.parent / "media"
    media = {VisualKind.IMAGE: media_dir / "fundus.png", VisualKind.VOLUME: media_dir / "mni_t1.nii.gz",
             VisualKind.VIDEO: sorted(media_dir.glob("endoscopy_*.mp4"))[0]}  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny, tok = build_preset("tiny")
        tiny.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg["media"].save(tmp)
        model, tokenizer, options = load_for_inference(tmp, device=cfg["device"].type)
        models = [("tiny (saved)", model, tokenizer, options)]
    if cfg["preset"] != "tiny":
        big, big_tok = build_preset(cfg["preset"])
        models.append(
            (cfg["preset"], big.to(cfg["device"], cfg["dtype"]).eval(), big_tok, cfg["media"])
        )
    for name, model, tokenizer, options in models:
        for kind, path in media.items():
            for prune in (True, False):
                opts = options.replace(prune=prune)
                answer_questions(model, tokenizer, kind, path, ["warm up"], opts, max_new_tokens=2)
                start = time.perf_counter()
                a = answer_questions(
                    model, tokenizer, kind, path, ["What is shown?"], opts, max_new_tokens=16
                )[0]
                results.append({"model": name, "kind": kind.name.lower(), "prune": prune,
                                "seconds": time.perf_counter() - start, "visual_tokens": a.visual_tokens})  # fmt: skip
    return {"rows": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small budgets")
    parser.add_argument("--out", default="e2e_out")
    parser.add_argument(
        "--data", help="demo data folder (default: gpu_wheels/demo_data, else built)"
    )
    parser.add_argument("--parts", default="tower,train,memory,l1_prune,infer")
    args = parser.parse_args(argv)
    cfg = settings(args.smoke)
    if cfg["device"].type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke, or on a GPU machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    carried = Path(__file__).resolve().parent.parent / "gpu_wheels" / "demo_data"
    data_dir = Path(args.data) if args.data else carried
    if not (data_dir / "stage3.json").is_file():
        from omnivmed.demo import build_demo_dataset

        data_dir = out / "demo_data"
        build_demo_dataset(data_dir)
    data = data_dir / "stage3.json"
    parts = {
        "tower": lambda: bench_tower(cfg, out),
        "train": lambda: bench_train(cfg, data, out),
        "memory": lambda: (
            bench_memory(cfg, data, out) if cfg["memory"] else {"skipped": "GPU only"}
        ),
        "l1_prune": lambda: bench_prune(cfg, out),
        "infer": lambda: bench_infer(cfg, data, out),
    }
    results, failed = (
        {"environment": environment(cfg["device"]), "smoke": args.smoke, "preset": cfg["preset"]},
        [],
    )
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            results[name] = parts[name]()
        except Exception as exc:  # one part's failure must not hide the others' numbers
            failed.append(name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            (out / f"{name}_error.log").write_text(traceback.format_exc())
            print(f"!!! {name} failed: {exc}", flush=True)
        results[name + "_seconds"] = time.perf_counter() - start
        (out / "e2e.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_summary(results)
    return 1 if failed else 0


def print_summary(results: dict) -> None:
    lines = []
    tower = results.get("tower", {})
    if "time_ratio" in tower:
        lines.append(("tower fwd+bwd, pruned / unpruned time", f"{tower['time_ratio']:.2f} "
                      f"({tower['pruned_tokens']} vs {tower['unpruned_tokens']} tokens)", "<= 0.5"))  # fmt: skip
    for kind in ("pruned", "unpruned"):
        if f"{kind}_fused_vs_composite" in tower:
            lines.append((f"tower fwd+bwd {kind}, fused speed-up over composite",
                          f"{tower[f'{kind}_fused_vs_composite']:.2f}x "
                          f"({tower[f'{kind}_fused_ms']:.1f} vs {tower[f'{kind}_composite_ms']:.1f} ms)", ""))  # fmt: skip
    train = results.get("train", {})
    if "speedup_volumes_videos" in train:
        lines.append(
            (
                "train vol+video/s, pruning on / off",
                f"{train['speedup_volumes_videos']:.2f}x",
                ">= 1.5x",
            )
        )
        lines.append(
            ("train MFU (LLM), pruning on", f"{100 * train['pruning_on']['mfu_llm']:.1f}%", "")
        )
    for r in results.get("memory", {}).get("rows", []):
        label = f"peak/GPU ckpt={r['gradient_checkpointing']} offload={r['offload']}"
        eight = f", 8 GPUs {r['per_gpu_8_mib'] / 1024:.1f} GiB" if r.get("per_gpu_8_mib") else ""
        lines.append((label, f"{r['peak_memory_mib'] / 1024:.1f} GiB{eight}", "< 24 GB (8 GPUs)"))
    for r in results.get("l1_prune", {}).get("rows", []) or []:
        lines.append((f"l1_prune {r['input']} {r['dtype']}", f"{r['op_over_floor']:.2f}x floor, "
                      f"{r.get('x_loop', 0):.0f}x loop, syncs {r.get('padded_host_syncs', '-')}", ">= 75% of copy bw"))  # fmt: skip
    for r in results.get("infer", {}).get("rows", []):
        lines.append(
            (
                f"infer {r['model']} {r['kind']} prune={r['prune']}",
                f"{r['seconds']:.2f} s ({r['visual_tokens']} tok)",
                "",
            )
        )
    for name in ("tower", "train", "memory", "l1_prune", "infer"):
        if "error" in results.get(name, {}):
            lines.append((f"{name} FAILED", results[name]["error"][:60], ""))
    width = max(len(a) for a, _, _ in lines) if lines else 10
    print("\n=== summary ===")
    for a, b, c in lines:
        print(f"{a:<{width}}  {b:<40}  {c}")


if __name__ == "__main__":
    raise SystemExit(main())
