"""Pure-PyTorch references of the fused ops.

They define what the kernels compute, serve as the fallback nobody has to trust blindly,
and are the eager baselines of the benchmarks. Tests run them in float64 as ground truth.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def rope_frequency_table(
    sections: Sequence[int],
    theta: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair inverse frequency and axis index for `sections`.

    Pair j of axis a has inverse frequency theta^(-j / sections[a]). The frequencies are
    computed in float64 and then rounded to `dtype`, as the kernels do.
    """
    inv_freq, axis = [], []
    for a, count in enumerate(sections):
        j = torch.arange(count, dtype=torch.float64)
        inv_freq.append(
            torch.pow(torch.tensor(float(theta), dtype=torch.float64), -j / max(count, 1))
        )
        axis.append(torch.full((count,), a, dtype=torch.long))
    return torch.cat(inv_freq).to(device=device, dtype=dtype), torch.cat(axis).to(device)


def rope_nd_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    sections: Sequence[int],
    theta: float = 10000.0,
    inverse: bool = False,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Multi-axis rotary embedding, eager PyTorch (see DESIGN.md, `rope_nd`).

    `compute_dtype` defaults to float64 for float64 inputs and float32 otherwise, which is
    the contract of the kernels ("math in fp32, result in x's dtype").
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    inv_freq, axis = rope_frequency_table(sections, theta, device=x.device, dtype=compute_dtype)
    angle = positions[:, axis].to(compute_dtype) * inv_freq  # [L, D/2]
    if inverse:
        angle = -angle
    cos = angle.cos().unsqueeze(1)
    sin = angle.sin().unsqueeze(1)
    xf = x.to(compute_dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def l1_prune_reference(
    patches: torch.Tensor,
    cu_frames: torch.Tensor,
    grid: Sequence[int],
    threshold: float = 0.1,
    mode: str = "previous",
    unit: int = 1,
    min_keep_per_frame: int = 0,
    *,
    return_sums: bool = False,
):
    """Medical-aware token pruning, frame by frame in eager PyTorch (see `l1_prune`).

    Unit sums of |difference| are exact int64 for uint8 inputs and float64 otherwise; a
    unit is kept iff ``sum >= threshold * values_per_unit`` (in float64), the rule the
    kernels apply. With ``return_sums=True`` also returns the `[F, U]` float64 sums (NaN
    for first frames), so tests can tell decisions that sit on the threshold.
    """
    from .prune import PruneResult  # the result type lives with the op

    frames, patches_per_frame, values = patches.shape
    grid_h, grid_w = (int(v) for v in grid)
    k = int(unit)
    units_h, units_w = grid_h // k, grid_w // k
    units = units_h * units_w
    exact = patches.dtype == torch.uint8
    x = patches.to(torch.int64 if exact else torch.float64)

    def by_unit(frame: torch.Tensor) -> torch.Tensor:  # [N, P] -> [U, k*k*P]
        return (
            frame.reshape(units_h, k, units_w, k, values).permute(0, 2, 1, 3, 4).reshape(units, -1)
        )

    def to_patches(unit_mask: torch.Tensor) -> torch.Tensor:  # [U] -> [N]
        grid_mask = unit_mask.reshape(units_h, units_w)
        return grid_mask.repeat_interleave(k, 0).repeat_interleave(k, 1).reshape(-1)

    cu = [int(v) for v in cu_frames.tolist()]
    keep = torch.zeros(frames, patches_per_frame, dtype=torch.bool, device=patches.device)
    sums_all = torch.full((frames, units), float("nan"), dtype=torch.float64, device=patches.device)
    threshold_count = float(threshold) * k * k * values
    for b in range(len(cu) - 1):
        keep[cu[b]] = True
        reference = by_unit(x[cu[b]]).clone()
        for f in range(cu[b] + 1, cu[b + 1]):
            current = by_unit(x[f])
            compare_to = by_unit(x[f - 1]) if mode == "previous" else reference
            sums = (current - compare_to).abs().sum(dim=1)
            unit_keep = sums.to(torch.float64) >= threshold_count
            if min_keep_per_frame > 0:
                order = sorted(range(units), key=lambda u: (-sums[u].item(), u))
                unit_keep[order[:min_keep_per_frame]] = True
            if mode == "last_kept":
                reference[unit_keep] = current[unit_keep]
            keep[f] = to_patches(unit_keep)
            sums_all[f] = sums.to(torch.float64)

    index = keep.reshape(-1).nonzero().squeeze(1)
    frame_of = index // patches_per_frame
    patch_of = index % patches_per_frame
    item_start = torch.zeros(frames, dtype=torch.int64, device=patches.device)
    for b in range(len(cu) - 1):
        item_start[cu[b] : cu[b + 1]] = cu[b]
    positions = torch.stack(
        (frame_of - item_start[frame_of], patch_of // grid_w, patch_of % grid_w), dim=1
    ).to(torch.int32)
    kept_before = torch.cat((keep.new_zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)))
    cu_seqlens = kept_before[torch.tensor(cu, device=patches.device)].to(torch.int32)
    result = PruneResult(keep, index, positions, cu_seqlens, patches.reshape(-1, values)[index])
    return (result, sums_all) if return_sums else result


def rope_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sections: Sequence[int],
    theta: float = 10000.0,
    softmax_scale: float | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rotate q and k (`rope_nd_reference`), then softmax attention per item, eagerly."""
    dtype = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    rq = rope_nd_reference(q.to(dtype), positions, sections, theta)
    rk = rope_nd_reference(k.to(dtype), positions, sections, theta)
    vv = v.to(dtype)
    out = torch.zeros_like(vv)
    bounds = cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        scores = torch.einsum("qhd,khd->hqk", rq[a:b], rk[a:b]) * scale
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vv[a:b])
    return out.to(q.dtype)
