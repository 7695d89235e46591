"""rope_attention: against a float64 reference (flash-attention's error rule), gradients,
opcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import omnivmed_ext
from omnivmed_ext import cu_seqlens_from_lengths
from omnivmed_ext.reference import rope_attention_reference

LAYOUTS = {"one token": [1], "97": [97], "1025": [1025], "many items": [1, 17, 97, 5, 64, 33]}
HEAD_DIMS = [64, 72, 80, 96, 128]


def sections_for(head_dim: int, with_t: bool) -> tuple[int, int, int]:
    half = head_dim // 2
    t = half // 4 if with_t else 0
    h = (half - t) // 2
    return (t, h, half - t - h)


def make_inputs(lengths, heads, head_dim, dtype, device):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    pos = torch.randint(0, 64, (total, 3), dtype=torch.int32, device=device)
    cu = cu_seqlens_from_lengths(lengths, device=device)
    return q, k, v, pos, cu, max(lengths)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("with_t", [True, False])
def test_matches_float64_reference(device, dtype, head_dim, layout, with_t):
    lengths = LAYOUTS[layout]
    if device == "cpu" and layout == "1025" and head_dim != 128:
        lengths = [257]  # keep the CPU suite fast; 1025 runs at head dim 128
    sections = sections_for(head_dim, with_t)
    q, k, v, pos, cu, max_len = make_inputs(lengths, 2, head_dim, dtype, device)
    grad = torch.randn_like(q)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = omnivmed_ext.rope_attention(*ins, pos, cu, max_len, sections)
    out.backward(grad)
    ref64_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref64 = rope_attention_reference(*ref64_in, pos, cu, sections)
    ref64.backward(grad.double())
    low_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low = rope_attention_reference(*low_in, pos, cu, sections, compute_dtype=dtype)
    low.backward(grad)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert err(out, ref64) <= 2 * err(low, ref64) + atol
    for got, want, lp in zip(ins, ref64_in, low_in, strict=True):
        assert err(got.grad, want.grad) <= 3 * err(lp.grad, want.grad) + atol


@pytest.mark.parametrize("device", DEVICES)
def test_items_do_not_attend_to_each_other(device):
    q, k, v, pos, cu, m = make_inputs([5, 7], 2, 64, torch.float32, device)
    both = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, (8, 12, 12))
    first = omnivmed_ext.rope_attention(q[:5], k[:5], v[:5], pos[:5], cu[:2], 5, (8, 12, 12))
    torch.testing.assert_close(both[:5], first)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    q, k, v, pos, cu, m = make_inputs([3, 6], 2, 64, torch.float32, device)
    op = torch.ops.omnivmed.rope_attention.default
    torch.library.opcheck(op, (q, k, v, pos, cu, m, [8, 12, 12], 10000.0, None))
    torch.library.opcheck(op, (q.requires_grad_(), k, v, pos, cu, m + 4, [8, 12, 12], 500.0, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip

    def block(q, k, v):
        return omnivmed_ext.rope_attention(q * 2, k, v, pos, cu, m, (8, 12, 12)).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    a = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    block(*a).backward()
    compiled(*b).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y.grad, x.grad)


def test_bad_input():
    q, k, v, pos, cu, m = make_inputs([4, 4], 2, 64, torch.float32, "cpu")
    call = omnivmed_ext.rope_attention
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        call(*(torch.randn(8, 2, 48) for _ in range(3)), pos, cu, m, (6, 9, 9))
    with pytest.raises(ValueError, match="end at L = 8"):
        call(q, k, v, pos, torch.tensor([0, 4, 7], dtype=torch.int32), m, (8, 12, 12))
    with pytest.raises(ValueError, match="an item has 4 tokens but max_seqlen = 3"):
        call(q, k, v, pos, cu, 3, (8, 12, 12))
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k.double(), v, pos, cu, m, (8, 12, 12))
    with pytest.raises(ValueError, match="same shape"):
        call(q, k[:7], v, pos, cu, m, (8, 12, 12))
    with pytest.raises(ValueError, match="one device"):
        call(q, k, v, pos, cu.to("meta"), m, (8, 12, 12))
    with pytest.raises(ValueError, match="must sum to D/2"):
        call(q, k, v, pos, cu, m, (8, 12, 11))
