"""rope_attention against two baselines measured in the same run:

* B0: HF Qwen2-VL-style eager rotary (cos/sin tables, rotate_half) + SDPA per item;
* B1: our rope_nd + the best varlen attention available: flash-attn's
  `flash_attn_varlen_func` if installed, else torch's own flash-attention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`), else SDPA per item. The JSON names which.

Forward and forward+backward in bf16 (fp32 on the CPU). FLOPs are counted as
4 * L_i^2 * D * H per item for the forward and 2.5x that for forward+backward
(`*_fwdbwd_tflops`; `*_fwdbwd_tflops_fa` uses flash-attention's 3.5x). On a GPU both
CUDA backends of rope_attention are timed: "flash" (the default: rope_nd + torch's
varlen_attn, SDPA for one long item), "fused" (one-kernel forward and backward) and
"composite". The shapes are the ones the so400m vision tower sees (16 heads, head dim 72):
64 images of 729 tokens, 4 volumes of 32 x 256 tokens pruned to ~30%, one 32-frame clip
of 1,024 tokens per frame attended jointly, and head dims 64/72/80/128 at 8,192 tokens.

    python benchmarks/bench_rope_attention.py --device cuda
    python benchmarks/bench_rope_attention.py            # CPU: small sizes
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from _timing import print_table, time_call, write_results

import omnivmed_ext

try:  # B1 uses flash-attn's varlen kernel when the environment has it
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # else torch's built-in flash-attention varlen kernel
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def b1_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """Which attention B1 uses on this device and dtype."""
    if device.type == "cuda" and dtype != torch.float32:
        if flash_attn_varlen_func is not None:
            return "flash_attn.flash_attn_varlen_func"
        if varlen_attn is not None:
            return "torch.nn.attention.varlen.varlen_attn"
    return "sdpa per item"


def sections_for(d: int) -> list[int]:
    half = d // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def qwen2vl_rotary(x, positions, sections, theta=10000.0):
    """B0's rotary: the eager HF Qwen2-VL style (tables, rotate_half, several kernels)."""
    half = x.shape[-1] // 2
    freqs = []
    for axis, count in enumerate(sections):
        inv = 1.0 / theta ** (
            torch.arange(count, device=x.device, dtype=torch.float32) / max(count, 1)
        )
        freqs.append(positions[:, axis : axis + 1].float() * inv)
    emb = torch.cat(freqs, dim=-1)
    emb = torch.cat((emb, emb), dim=-1)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * emb.cos() + rotated.float() * emb.sin()).to(x.dtype)


def per_item_sdpa(q, k, v, bounds):
    outs = [
        F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                       v[a:b].transpose(0, 1)[None])[0].transpose(0, 1)
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip
    return torch.cat(outs)


def b0(q, k, v, pos, cu, max_len, sections):
    return per_item_sdpa(
        qwen2vl_rotary(q, pos, sections), qwen2vl_rotary(k, pos, sections), v, cu.tolist()
    )


def b1(q, k, v, pos, cu, max_len, sections):
    rq = omnivmed_ext.rope_nd(q, pos, sections)
    rk = omnivmed_ext.rope_nd(k, pos, sections)
    kernel = b1_kernel(q.device, q.dtype)
    if kernel.startswith("flash_attn"):
        return flash_attn_varlen_func(rq, rk, v, cu, cu, max_len, max_len)
    if kernel.startswith("torch"):
        return varlen_attn(rq, rk, v, cu, cu, max_len, max_len)
    return per_item_sdpa(rq, rk, v, cu.tolist())


def ours(backend):
    def run(q, k, v, pos, cu, max_len, sections):
        with omnivmed_ext.attention.use_cuda_backend(backend):
            return omnivmed_ext.rope_attention(
                q, k, v, pos, cu, max_len, sections, check_seqlens=False
            )

    return run


# (name, items, tokens per item, heads, head dim) as the vision tower sees them.
GPU_SHAPES = [
    ("images 64x729", 64, 729, 16, 72),
    ("volumes 4x32x256 pruned 30%", 4, 2458, 16, 72),
    ("clip 32x1024 joint", 1, 32768, 16, 72),
    ("long D64", 4, 8192, 16, 64),
    ("long D72", 4, 8192, 16, 72),
    ("long D80", 4, 8192, 16, 80),
    ("long D128", 4, 8192, 16, 128),
]
CPU_SHAPES = [
    ("short D64", 8, 97, 4, 64),
    ("short D72", 8, 97, 4, 72),
    ("long D80", 2, 1025, 4, 80),
    ("long D128", 2, 1025, 4, 128),
]


def bench(device, dtype, shape, args) -> dict:
    label, items, item_len, heads, d = shape
    lengths = [item_len] * items
    cu = omnivmed_ext.cu_seqlens_from_lengths(lengths, device=device)
    length = sum(lengths)
    pos = torch.randint(0, 64, (length, 3), dtype=torch.int32, device=device)
    sections = sections_for(d)
    q, k, v = (
        torch.randn(length, heads, d, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    flops_fwd = 4 * items * item_len * item_len * heads * d
    row = {
        "shape": label,
        "dtype": str(dtype).split(".")[-1],
        "item_len": item_len,
        "items": items,
        "H": heads,
        "D": d,
    }
    candidates = [("B0", b0), ("B1", b1)]
    if q.is_cuda:
        candidates += [("flash", ours("flash")), ("fused", ours("fused")),
                       ("composite", ours("composite"))]  # fmt: skip
    else:
        candidates.append(("ours", ours("composite")))
    for name, fn in candidates:

        def step(i, fn=fn):
            out = fn(q, k, v, pos, cu, item_len, sections)
            out.backward(torch.ones_like(out))

        try:
            fwd = time_call(lambda i, fn=fn: fn(q, k, v, pos, cu, item_len, sections), device,
                            warmup=args.warmup, iters=args.iters)["median_ms"]  # fmt: skip
            both = time_call(step, device, warmup=args.warmup, iters=args.iters)["median_ms"]
        except Exception as exc:  # one failing candidate must not hide the others
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"!!! {label} {name}: {row[f'{name}_error']}", flush=True)
            continue
        row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd, both
        row[f"{name}_fwd_tflops"] = flops_fwd / fwd / 1e9
        row[f"{name}_fwdbwd_tflops"] = 2.5 * flops_fwd / both / 1e9
        row[f"{name}_fwdbwd_tflops_fa"] = 3.5 * flops_fwd / both / 1e9
    for name, _ in candidates[2:]:
        for kind in ("fwd", "fwdbwd"):
            for base in ("B0", "B1"):
                if f"{base}_{kind}_ms" in row and f"{name}_{kind}_ms" in row:
                    row[f"{name}_{kind}_vs_{base}"] = (
                        row[f"{base}_{kind}_ms"] / row[f"{name}_{kind}_ms"]
                    )
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.iters = args.iters or (50 if gpu else 5)
    args.warmup = args.warmup or (10 if gpu else 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for shape in GPU_SHAPES if gpu else CPU_SHAPES:
        rows.append(bench(device, dtype, shape, args))
        print(f"{shape[0]}: done", flush=True)
    name = "flash" if gpu else "ours"
    b1_used = b1_kernel(device, dtype)
    print(f"B1 attention: {b1_used}")
    print_table(rows, [("shape", "shape", "s"), ("D", "D", "d"), ("B0_fwdbwd_ms", "B0 ms", ".2f"),
                       ("B1_fwdbwd_ms", "B1 ms", ".2f"), (f"{name}_fwdbwd_ms", f"{name} ms", ".2f"),
                       (f"{name}_fwd_tflops", "fwd TF/s", ".3f"),
                       (f"{name}_fwdbwd_tflops", "f+b TF/s", ".3f"),
                       (f"{name}_fwd_vs_B1", "fwd x B1", ".2f"),
                       (f"{name}_fwdbwd_vs_B0", "f+b x B0", ".2f"),
                       (f"{name}_fwdbwd_vs_B1", "f+b x B1", ".2f")])  # fmt: skip
    if gpu:
        print_table(rows, [("shape", "shape", "s"), ("fused_fwdbwd_ms", "fused ms", ".2f"),
                           ("fused_fwdbwd_vs_B1", "fused f+b x B1", ".2f"),
                           ("composite_fwdbwd_ms", "composite ms", ".2f"),
                           ("composite_fwdbwd_vs_B1", "composite f+b x B1", ".2f")])  # fmt: skip
    if not args.no_save:
        print(
            "wrote",
            write_results(
                "rope_attention",
                device,
                rows,
                {
                    "B1_attention": b1_used,
                    "flop_count": "forward 4*L_i^2*D*H per item; forward+backward 2.5x that "
                    "(_fa columns: 3.5x, flash-attention's convention)",
                },
            ),
        )


if __name__ == "__main__":
    main()
