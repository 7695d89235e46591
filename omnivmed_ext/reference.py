"""Pure-PyTorch references of the fused ops.

They define what the kernels compute, serve as the fallback nobody has to trust blindly,
and are the eager baselines of the benchmarks. Tests run them in float64 as ground truth.
"""

from __future__ import annotations

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
