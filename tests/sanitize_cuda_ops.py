"""Runs every CUDA kernel variant once on odd shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python tests/sanitize_cuda_ops.py
    compute-sanitizer --tool racecheck python tests/sanitize_cuda_ops.py

Exits non-zero if a result disagrees with the CPU kernel, so a sanitizer run also proves
the outputs were fully written.
"""

from __future__ import annotations

import torch

import omnivmed_ext


def rope_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for head_dim, sections in (
            (2, (1,)),
            (8, (1, 1, 2)),
            (72, (4, 16, 16)),
            (80, (8, 16, 16)),
            (128, (16, 24, 24)),
            (256, (32, 32, 32, 32)),
        ):
            for length, heads in ((1, 1), (97, 3), (1025, 16)):
                yield dtype, head_dim, sections, length, heads


def prune_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        for mode in ("previous", "last_kept"):
            for unit, grid, min_keep in ((1, (5, 7), 0), (2, (6, 4), 2), (1, (1, 1), 1)):
                yield dtype, mode, unit, grid, min_keep


def check_prune() -> int:
    failures = 0
    for dtype, mode, unit, grid, min_keep in prune_cases():
        n = grid[0] * grid[1]
        frames = torch.rand(9, n, 13)
        frames[3] = frames[2]
        frames[6:] = frames[5] + 0.01 * torch.rand(3, n, 13)
        if dtype == torch.uint8:
            patches = (frames * 255).to(torch.uint8)
            threshold = 10.0
        else:
            patches = frames.to(dtype)
            threshold = 0.1
        cu = torch.tensor([0, 1, 5, 9], dtype=torch.int32)
        cpu = omnivmed_ext.l1_prune_padded(patches, cu, grid, threshold, mode, unit, min_keep)
        gpu = omnivmed_ext.l1_prune_padded(
            patches.cuda(), cu.cuda(), grid, threshold, mode, unit, min_keep
        )
        torch.cuda.synchronize()
        for name, a, b in zip(cpu._fields, cpu, gpu, strict=True):
            if not torch.equal(a, b.cpu()):
                failures += 1
                print(f"MISMATCH l1_prune {name} {dtype} {mode} unit={unit} grid={grid}")
    return failures


def check_rope_attention() -> int:
    """Every fused kernel variant (dtype x head dim), forward and backward, against the CPU
    path in float32, on items of 1, 97 and 200 tokens plus an empty item."""
    failures = 0
    lengths = [1, 97, 0, 200]
    cu = omnivmed_ext.cu_seqlens_from_lengths(lengths)
    total = sum(lengths)
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in omnivmed_ext.attention.SUPPORTED_HEAD_DIMS:
            half = head_dim // 2
            sections = (half // 4, half // 4, half - 2 * (half // 4))
            q, k, v, grad = (torch.randn(total, 3, head_dim).to(dtype) for _ in range(4))
            pos = torch.randint(0, 40, (total, 3), dtype=torch.int32)
            ins = [t.float().requires_grad_() for t in (q, k, v)]
            ref = omnivmed_ext.rope_attention(*ins, pos, cu, 200, sections)
            ref.backward(grad.float())
            args = (pos.cuda(), cu.cuda(), 256, sections, 1e4, None)
            cq, ck, cv, cg = (t.cuda() for t in (q, k, v, grad))
            out, lse = torch.ops.omnivmed._rope_attention_fused_forward(cq, ck, cv, *args)
            grads = torch.ops.omnivmed._rope_attention_fused_backward(
                cg, cq, ck, cv, out, lse, *args
            )
            torch.cuda.synchronize()
            for name, got, want in zip(
                ("out", "dq", "dk", "dv"), (out, *grads), (ref, *(t.grad for t in ins)), strict=True
            ):
                scale = want.abs().max().item() + 1e-6
                error = (got.cpu().float() - want).abs().max().item() / scale
                if not error < 3e-2:
                    failures += 1
                    print(f"MISMATCH rope_attention {name} {dtype} D={head_dim}: {error:.3g}")
    return failures


def main() -> int:
    failures = check_prune() + check_rope_attention()
    for dtype, head_dim, sections, length, heads in rope_cases():
        # The offset view makes the start misaligned, exercising the narrow vector widths.
        for offset in (0, 1):
            buf = torch.randn(length * heads * head_dim + offset, dtype=dtype)
            x = buf[offset:].view(length, heads, head_dim)
            pos = torch.randint(-5, 300, (length, len(sections)), dtype=torch.int32)
            cpu = omnivmed_ext.rope_nd(x, pos, sections)
            gpu = omnivmed_ext.rope_nd(x.cuda(), pos.cuda(), sections, inverse=False)
            back = omnivmed_ext.rope_nd(gpu, pos.cuda(), sections, inverse=True)
            torch.cuda.synchronize()
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(gpu.cpu(), cpu, rtol=tol, atol=tol):
                failures += 1
                print(f"MISMATCH rope_nd {dtype} D={head_dim} L={length} H={heads} offset={offset}")
            if not torch.allclose(back.cpu(), x, rtol=4 * tol, atol=4 * tol):
                failures += 1
                print(f"MISMATCH rope_nd inverse {dtype} D={head_dim} L={length} offset={offset}")
    print(f"sanitize_cuda_ops: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
