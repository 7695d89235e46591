"""Benchmark of rope_nd against the eager PyTorch reference and torch.compile of it.

On CUDA it also measures a device-to-device copy of the same bytes in the same run and
reports the op's achieved bandwidth as a fraction of it (rope_nd reads x once and writes
the output once, so a copy is its floor).

    python benchmarks/bench_rope.py                 # CPU, the default shapes
    python benchmarks/bench_rope.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse

import torch
from _timing import print_table, time_call, write_results

import omnivmed_ext
from omnivmed_ext.reference import rope_nd_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (dtype, L, H, D, sections). The first CPU and the first CUDA shape are the targets.
CPU_SHAPES = [
    ("fp32", 16384, 16, 72, (4, 16, 16)),
    ("bf16", 16384, 16, 72, (4, 16, 16)),
    ("fp32", 4096, 16, 64, (8, 12, 12)),
    ("fp32", 4096, 12, 128, (16, 24, 24)),
]
CUDA_SHAPES = [
    ("bf16", 65536, 16, 80, (8, 16, 16)),
    ("bf16", 65536, 16, 72, (4, 16, 16)),
    ("bf16", 65536, 16, 64, (8, 12, 12)),
    ("bf16", 65536, 16, 128, (16, 24, 24)),
    ("fp16", 65536, 16, 80, (8, 16, 16)),
    ("fp32", 65536, 16, 80, (8, 16, 16)),
    ("bf16", 4096, 16, 80, (8, 16, 16)),
]


def bench_shape(device, dtype_name, length, heads, head_dim, sections, args) -> dict:
    dtype = DTYPES[dtype_name]
    copies = 1 if device.type == "cpu" else 3  # rotate inputs past the GPU's L2
    xs = [torch.randn(length, heads, head_dim, device=device, dtype=dtype) for _ in range(copies)]
    pos = torch.randint(0, 1024, (length, len(sections)), device=device, dtype=torch.int32)
    outs = [torch.empty_like(x) for x in xs]
    timing = dict(warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds)

    def op(i):
        return omnivmed_ext.rope_nd(xs[i % copies], pos, sections)

    def eager(i):
        return rope_nd_reference(xs[i % copies], pos, sections)

    err = (op(0).double() - rope_nd_reference(xs[0].double(), pos, sections)).abs().max().item()
    row = {
        "dtype": dtype_name,
        "L": length,
        "H": heads,
        "D": head_dim,
        "sections": list(sections),
        "max_abs_err_vs_fp64": err,
        "op_ms": time_call(op, device, **timing)["median_ms"],
        "eager_ms": time_call(eager, device, **timing)["median_ms"],
    }
    if not args.no_compile:
        compiled = torch.compile(rope_nd_reference, dynamic=False)
        row["compile_ms"] = time_call(
            lambda i: compiled(xs[i % copies], pos, sections), device, **timing
        )["median_ms"]
        row["speedup_vs_compile"] = row["compile_ms"] / row["op_ms"]
    row["speedup_vs_eager"] = row["eager_ms"] / row["op_ms"]
    moved = 2 * xs[0].numel() * xs[0].element_size() + pos.numel() * pos.element_size()
    row["op_GBps"] = moved / row["op_ms"] / 1e6
    if device.type == "cuda":
        copy_ms = time_call(lambda i: outs[i % copies].copy_(xs[i % copies]), device, **timing)[
            "median_ms"
        ]
        row["copy_GBps"] = 2 * xs[0].numel() * xs[0].element_size() / copy_ms / 1e6
        row["fraction_of_copy"] = row["op_GBps"] / row["copy_GBps"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs (default 30 CPU, 200 CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--min-seconds", type=float, default=0.0, help="CPU: time for at least this long"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--quick", action="store_true", help="only the target shape")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.iters = args.iters or (30 if device.type == "cpu" else 200)
    args.warmup = args.warmup or (5 if device.type == "cpu" else 25)
    shapes = CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES
    if args.quick:
        shapes = shapes[:1]
    rows = []
    for shape in shapes:
        rows.append(bench_shape(device, *shape, args))
        print(f"done {shape}", flush=True)
    columns = [
        ("dtype", "dtype", "s"),
        ("L", "L", "d"),
        ("H", "H", "d"),
        ("D", "D", "d"),
        ("op_ms", "op ms", ".3f"),
        ("eager_ms", "eager ms", ".3f"),
        ("compile_ms", "compile ms", ".3f"),
        ("speedup_vs_eager", "x eager", ".2f"),
        ("speedup_vs_compile", "x compile", ".2f"),
        ("op_GBps", "op GB/s", ".1f"),
        ("copy_GBps", "copy GB/s", ".1f"),
        ("fraction_of_copy", "of copy", ".2f"),
        ("max_abs_err_vs_fp64", "max err", ".1e"),
    ]
    print_table(rows, columns)
    if not args.no_save:
        path = write_results(
            "rope_nd",
            device,
            rows,
            {
                "baselines": {
                    "eager": "omnivmed_ext.reference.rope_nd_reference (eager PyTorch, fp32 math)",
                    "compile": "torch.compile(rope_nd_reference)",
                    "copy": "Tensor.copy_ of the same tensor, device to device (CUDA only)",
                }
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
