"""The whole stack on one device, in one run: what pruning buys and what training costs.

1. tower: the vision tower alone (SigLIP so400m shape, 27 layers), forward + backward on
   the MNI152 template's 32 slices at the 448x448 budget, pruned at 0.1 vs unpruned, with
   the old default attention backend (composite), the new one (flash) and the new one
   with compiled layers: ms, tokens/s, TFLOP/s and `..._mfu` over 989 TFLOP/s; beside it
   transformers' SiglipVisionModel (so400m-patch14-384 config, SDPA) on 32 slices at 384.
2. train: stage 3 on the demo mixture (images, the MNI volume, the CT series, the
   endoscopy videos) at the 1.5B shape and the presets' media settings: pruning on, off,
   and the step as it was before the DataLoader, packing, varlen LLM attention and fused
   cross-entropy (pruning on): samples/s, volumes+videos/s, text, visual and tower
   tokens/s, the fraction of step time spent waiting for data, peak memory, and `..._mfu`:
   model FLOPs (6 x parameters x tokens, LLM and tower) over 989 TFLOP/s.
3. memory: peak memory of stage 3 at the 1.5B shape, world size 1 (ZeRO-2, everything
   trained, gradient checkpointing on and off, the optimizer offloaded, the plain loss
   instead of the fused one), and the per-GPU peak for 8 GPUs computed from the measured
   parts (`per_gpu_peak_gb_8_gpus`, see `per_gpu_for`).
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
PEAK_BF16_TFLOPS = 989.0  # H100/H200 dense bf16


def tower_variants(device: torch.device) -> list[tuple[str, str | None, bool]]:
    """(label, CUDA attention backend, compiled layers): the old default (composite), the
    new one (flash), and the new one with compiled layers; on the CPU one path, eager and
    compiled."""
    if device.type == "cuda":
        return [("composite", "composite", False), ("flash", "flash", False),
                ("flash_compiled", "flash", True)]  # fmt: skip
    return [("eager", None, False), ("compiled", None, True)]


def tower_flops(params: int, cu: torch.Tensor, heads: int, head_dim: int, layers: int) -> float:
    """Forward+backward FLOPs: 6 x parameters x tokens, plus attention's 4 L^2 D H per
    item per layer, x 3 for forward and backward."""
    lengths = torch.diff(cu.long().cpu()).double()
    attention = 4.0 * float((lengths**2).sum()) * head_dim * heads * layers
    return 6.0 * params * float(lengths.sum()) + 3.0 * attention


def time_tower(tower, inputs, device, compiled: bool) -> float:
    def step(_):
        tower.zero_grad(set_to_none=True)
        tower(*inputs).float().square().mean().backward()

    return time_call(step, device, warmup=3 if compiled else 2,
                     iters=5 if device.type == "cpu" else 10)["median_ms"]  # fmt: skip


def bench_tower(cfg: dict, out: Path) -> dict:
    import omnivmed_ext
    from omnivmed.processing import pack_visual_items

    with torch.device("meta"):
        shape_model, tok = build_preset(cfg["preset"])
    vision = shape_model.config.vision_config
    media = cfg["media"].replace(max_slices=cfg["tower_slices"])
    processor = OmniVMedProcessor(shape_model.config, tok, media)
    item = processor.load(Media(VisualKind.VOLUME, mni_template_path()))
    packs = {}
    for prune in (False, True):
        batch = pack_visual_items([item], shape_model.config, media, prune=prune)
        packs["pruned" if prune else "unpruned"] = (
            batch.pixel_values.to(cfg["device"], cfg["dtype"]),
            batch.visual_positions.to(cfg["device"]),
            batch.visual_cu_seqlens.to(cfg["device"]),
        )
    row = {"peak_tflops": PEAK_BF16_TFLOPS, "layers": vision.num_hidden_layers}
    for label, backend, compiled in tower_variants(cfg["device"]):
        torch._dynamo.reset()
        tower = type(shape_model.vision_tower)(vision).to(cfg["device"], cfg["dtype"])
        params = sum(p.numel() for p in tower.parameters())
        if compiled:
            tower.compile_layers()
        chosen = (omnivmed_ext.attention.use_cuda_backend(backend) if backend
                  else contextlib.nullcontext())  # fmt: skip
        for kind, inputs in packs.items():
            with chosen:
                ms = time_tower(tower, inputs, cfg["device"], compiled)
            tokens = int(inputs[0].shape[0])
            flops = tower_flops(params, inputs[2], vision.num_attention_heads,
                                vision.head_dim, vision.num_hidden_layers)  # fmt: skip
            key = f"{kind}_{label}"
            row[f"{key}_tokens"], row[f"{key}_ms"] = tokens, ms
            row[f"{key}_tokens_per_s"] = tokens / ms * 1e3
            row[f"{key}_tflops"] = flops / ms / 1e9
            row[f"{key}_mfu"] = row[f"{key}_tflops"] / PEAK_BF16_TFLOPS
        del tower
    # The headline numbers are the new default's (flash on a GPU), uncompiled.
    default = tower_variants(cfg["device"])[1 if cfg["device"].type == "cuda" else 0][0]
    for kind in ("pruned", "unpruned"):
        for key in ("tokens", "ms", "tflops", "mfu"):
            row[f"{kind}_{key}"] = row[f"{kind}_{default}_{key}"]
    row["time_ratio"] = row["pruned_ms"] / row["unpruned_ms"]
    row["token_ratio"] = row["pruned_tokens"] / row["unpruned_tokens"]
    if cfg["device"].type == "cuda":
        for kind in ("pruned", "unpruned"):
            row[f"{kind}_flash_vs_composite"] = (
                row[f"{kind}_composite_ms"] / row[f"{kind}_flash_ms"]
            )
    row.update(bench_siglip_baseline(cfg, packs["pruned"], row))
    return row


def bench_siglip_baseline(cfg: dict, pruned: tuple, row: dict) -> dict:
    """transformers' SiglipVisionModel (so400m-patch14-384 config, SDPA) on the volume's
    slices at its fixed 384x384 (729 tokens each): what a fixed-size SigLIP user runs.
    Its time does not depend on pixel values, so the resized slices are random."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if cfg["device"].type == "cuda":
        config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                    num_attention_heads=16, image_size=384, patch_size=14)  # fmt: skip
    else:
        config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    config._attn_implementation = "sdpa"
    model = SiglipVisionModel(config).to(cfg["device"], cfg["dtype"])
    slices = cfg["tower_slices"]
    pixels = torch.randn(slices, 3, config.image_size, config.image_size,
                         device=cfg["device"], dtype=cfg["dtype"])  # fmt: skip

    def step(_):
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels).last_hidden_state.float().square().mean().backward()

    ms = time_call(step, cfg["device"], warmup=2, iters=5 if cfg["device"].type == "cpu" else 10)[
        "median_ms"
    ]
    tokens = slices * (config.image_size // config.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())
    cu = torch.arange(0, tokens + 1, tokens // slices, dtype=torch.int32)
    flops = tower_flops(params, cu, config.num_attention_heads,
                        config.hidden_size // config.num_attention_heads, config.num_hidden_layers)  # fmt: skip
    out = {"siglip_sdpa_tokens": tokens, "siglip_sdpa_ms": ms, "siglip_sdpa_tokens_per_s": tokens / ms * 1e3,
           "siglip_sdpa_tflops": flops / ms / 1e9}  # fmt: skip
    out["siglip_sdpa_mfu"] = out["siglip_sdpa_tflops"] / PEAK_BF16_TFLOPS
    best = min(v for k, v in row.items() if k.startswith("pruned_") and k.endswith("_ms"))
    out["pruned_speedup_vs_siglip_sdpa"] = ms / best
    return out


# ---- 2. and 3. training ------------------------------------------------------------------
def matmul_peak_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    ms = time_call(lambda _: a @ b, device, warmup=3, iters=10)["median_ms"]
    return 2 * n**3 / ms / 1e9


# Dense bf16 peak of an H100/H200 (the 1979 figure assumes sparsity): MFU is counted against it.
PEAK_TFLOPS = 989.0


def param_counts(preset: str) -> dict[str, int]:
    with torch.device("meta"):
        shape_model, _ = build_preset(preset)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"llm": count(shape_model.language_model), "tower": count(shape_model.vision_tower),
            "all": count(shape_model)}  # fmt: skip


def model_mfu(row: dict, params: dict[str, int]) -> float:
    """Model FLOPs (6 x parameters x tokens, forward and backward, for the LLM and the
    vision tower; attention's own FLOPs left out) per second over PEAK_TFLOPS."""
    flops = 6 * (
        params["llm"] * row["llm_tokens_per_s"] + params["tower"] * row["tower_tokens_per_s"]
    )
    return flops / (PEAK_TFLOPS * 1e12)


@contextlib.contextmanager
def before_changes():
    """The training step as it was before the DataLoader, packing, varlen LLM attention
    and fused cross-entropy (the stage settings for the first two are passed by the caller)."""
    from unittest import mock

    from omnivmed.models.loss import fused_cross_entropy

    with mock.patch("omnivmed.models.modeling.default_llm_attention", lambda: "sdpa"), \
            fused_cross_entropy(False):  # fmt: skip
        yield


def train_workers(device: torch.device) -> int:
    import os

    return 2 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 4) - 4))


def bench_train(cfg: dict, data: Path, out: Path) -> dict:
    """Stage 3 with this package's training step, pruning on then off, then the step as it
    was before (no workers, padded rows, SDPA, plain loss) with pruning on: the most
    important numbers first, so a cut run still has them."""
    from bench_train import run

    params = param_counts(cfg["preset"])
    workers = train_workers(cfg["device"])
    variants = [("pruning_on", True, dict(num_workers=workers), contextlib.nullcontext),
                ("pruning_off", False, dict(num_workers=workers), contextlib.nullcontext),
                ("before_pruning_on", True, dict(num_workers=0, packing=False), before_changes)]  # fmt: skip
    result: dict = {"peak_tflops": PEAK_TFLOPS, "params": params, "num_workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prune, overrides, context in variants:
            try:  # one variant's failure must not cost the others' numbers
                with context():
                    row = run(data, Path(tmp) / name, prune, cfg["steps"], cfg["media"],
                              init=f"preset:{cfg['preset']}", **overrides)  # fmt: skip
            except Exception as exc:
                (out / f"train_{name}_error.log").write_text(traceback.format_exc())
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            row["mfu"] = model_mfu(row, params)
            result[name] = row
            result[f"{name}_mfu"] = row["mfu"]
            (out / "train_partial.json").write_text(json.dumps(result, indent=2, default=str))
    on, off, before = result["pruning_on"], result["pruning_off"], result["before_pruning_on"]
    if "error" not in on and "error" not in off:
        result["speedup_volumes_videos"] = on["volumes_videos_per_s"] / off["volumes_videos_per_s"]
    if "error" not in on and "error" not in before:
        result["speedup_samples_vs_before"] = on["samples_per_s"] / before["samples_per_s"]
    result["matmul_peak_tflops"] = matmul_peak_tflops(cfg["device"], cfg["dtype"])
    return result


def per_gpu_for(world: int, peak_mib: float, params: int) -> float:
    """ZeRO-2 over `world` GPUs from a world-size-1 peak: bf16 weights (2 bytes/param)
    stay whole; bf16 gradients (2) and the fp32 master weights + Adam moments (12) are
    split `world` ways; activations and workspace (the rest of the peak) stay."""
    split = 14 * params / 2**20
    return peak_mib - split + split / world


def bench_memory(cfg: dict, data: Path, out: Path) -> dict:
    """Peak memory of stage 3 at world size 1 (ZeRO-2, everything trained): checkpointing
    on and off, the optimizer offloaded, and the plain loss instead of the fused one; the
    per-GPU peak for 8 GPUs from each measured peak."""
    from bench_train import run

    from omnivmed.models.loss import fused_cross_entropy

    params = param_counts(cfg["preset"])["all"]
    variants = [(True, False, True), (False, False, True), (True, True, True), (True, False, False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt, offload, fused in variants:
            try:  # one variant's failure (out of memory) must not cost the others' numbers
                with fused_cross_entropy(fused):
                    row = run(data, Path(tmp) / f"m{ckpt}{offload}{fused}", True, 3, cfg["media"],
                              init=f"preset:{cfg['preset']}", gradient_checkpointing=ckpt, zero_stage=2,
                              offload=offload, num_workers=train_workers(cfg["device"]))  # fmt: skip
            except Exception as exc:
                row = {"error": f"{type(exc).__name__}: {exc}", "peak_memory_mib": float("nan")}
            row.update(gradient_checkpointing=ckpt, offload=offload, fused_cross_entropy=fused,
                       peak_gb=row["peak_memory_mib"] * 2**20 / 1e9)  # fmt: skip
            if not offload and "error" not in row:
                eight = per_gpu_for(8, row["peak_memory_mib"], params)
                row["per_gpu_peak_gb_8_gpus"] = eight * 2**20 / 1e9
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    best = rows[0]  # checkpointing on, fused loss, no offload
    return {"params": params, "rows": rows, "world_size_1_peak_gb": best["peak_gb"],
            "per_gpu_peak_gb_8_gpus": best.get("per_gpu_peak_gb_8_gpus")}  # fmt: skip


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
        model, processor = load_for_inference(tmp, device=cfg["device"].type)
        models = [("tiny (saved)", model, processor)]
    if cfg["preset"] != "tiny":
        big, big_tok = build_preset(cfg["preset"])
        big = big.to(cfg["device"], cfg["dtype"]).eval()
        models.append((cfg["preset"], big, OmniVMedProcessor(big.config, big_tok, cfg["media"])))
    for name, model, processor in models:
        for kind, path in media.items():
            for prune in (True, False):
                proc = processor.with_options(processor.options.replace(prune=prune))
                answer_questions(model, proc, kind, path, ["warm up"], max_new_tokens=2)
                start = time.perf_counter()
                a = answer_questions(
                    model, proc, kind, path, ["What is shown?"], max_new_tokens=16
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


def train_summary(train: dict) -> list[tuple[str, str, str]]:
    lines = []
    for name in ("pruning_on", "pruning_off", "before_pruning_on"):
        r = train.get(name)
        if r and "error" in r:
            lines.append((f"train {name} FAILED", r["error"][:60], ""))
        elif r:
            lines.append((f"train {name}: samples/s, vol+video/s, MFU, data wait",
                          f"{r['samples_per_s']:.2f}, {r['volumes_videos_per_s']:.2f}, "
                          f"{100 * r['mfu']:.1f}%, {100 * r['data_wait_fraction']:.1f}%",
                          "MFU >= 30%, wait < 5%" if name == "pruning_on" else ""))  # fmt: skip
    if "speedup_volumes_videos" in train:
        lines.append(("train vol+video/s, pruning on / off", f"{train['speedup_volumes_videos']:.2f}x", ">= 2x"))  # fmt: skip
    if "speedup_samples_vs_before" in train:
        lines.append(("train samples/s, now / before", f"{train['speedup_samples_vs_before']:.2f}x", ">= 3x"))  # fmt: skip
    return lines


def memory_summary(memory: dict) -> list[tuple[str, str, str]]:
    lines = []
    for r in memory.get("rows", []):
        label = (f"peak ckpt={r['gradient_checkpointing']} offload={r['offload']} "
                 f"fused_ce={r['fused_cross_entropy']}")  # fmt: skip
        if "error" in r:
            lines.append((label + " FAILED", r["error"][:60], ""))
            continue
        eight = r.get("per_gpu_peak_gb_8_gpus")
        eight = f", 8 GPUs {eight:.1f} GB/GPU" if eight else ""
        lines.append((label, f"{r['peak_gb']:.1f} GB{eight}", "<= 16 GB/GPU (8), 80 GB (1)"))
    return lines


def tower_summary(tower: dict) -> list[tuple[str, str, str]]:
    lines = []
    for kind in ("unpruned", "pruned"):
        if f"{kind}_mfu" in tower:
            lines.append((f"tower fwd+bwd {kind} (default backend)", f"{tower[f'{kind}_ms']:.1f} ms, "
                          f"{tower[f'{kind}_tflops']:.0f} TFLOP/s, MFU {tower[f'{kind}_mfu']:.1%}",
                          ">= 35% MFU" if kind == "unpruned" else ""))  # fmt: skip
        if f"{kind}_flash_vs_composite" in tower:
            lines.append((f"tower fwd+bwd {kind}, flash over composite",
                          f"{tower[f'{kind}_flash_vs_composite']:.2f}x", ""))  # fmt: skip
        for key in sorted(
            k for k in tower if k.startswith(f"{kind}_") and k.endswith("compiled_ms")
        ):
            lines.append((f"tower fwd+bwd {kind}, compiled layers", f"{tower[key]:.1f} ms", ""))
    if "pruned_speedup_vs_siglip_sdpa" in tower:
        lines.append(("volume fwd+bwd, pruned tower over SiglipVisionModel 384",
                      f"{tower['pruned_speedup_vs_siglip_sdpa']:.2f}x "
                      f"({tower['siglip_sdpa_ms']:.1f} ms)", ">= 3x"))  # fmt: skip
    return lines


def print_summary(results: dict) -> None:
    lines = []
    tower = results.get("tower", {})
    if "time_ratio" in tower:
        lines.append(("tower fwd+bwd, pruned / unpruned time", f"{tower['time_ratio']:.2f} "
                      f"({tower['pruned_tokens']} vs {tower['unpruned_tokens']} tokens)", "<= 0.35"))  # fmt: skip
    lines += tower_summary(tower)
    lines += train_summary(results.get("train", {})) + memory_summary(results.get("memory", {}))
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
