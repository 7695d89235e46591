"""rope_attention: against a float64 reference (flash-attention's error rule), gradients,
opcheck, torch.compile and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DEVICES

import omnivmed_ext
from omnivmed_ext import cu_seqlens_from_lengths
from omnivmed_ext.reference import rope_attention_reference, rope_nd_reference

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


# (device, CUDA backend): the CPU path, and on a GPU the composite and the fused kernels.
IMPLS = [
    pytest.param(("cpu", None), id="cpu"),
    pytest.param(("cuda", "composite"), id="cuda-composite", marks=pytest.mark.cuda),
    pytest.param(("cuda", "fused"), id="cuda-fused", marks=pytest.mark.cuda),
]
IMPL_DTYPES = {
    None: [torch.float32, torch.bfloat16],
    "composite": [torch.float32, torch.bfloat16],
    "fused": [torch.float16, torch.bfloat16],
}


@pytest.fixture
def impl(request):
    device, backend = request.param
    if backend is None:
        yield device, backend
        return
    with omnivmed_ext.attention.use_cuda_backend(backend):
        yield device, backend


def check_against_reference(lengths, heads, head_dim, dtype, device, sections, **kwargs):
    q, k, v, pos, cu, max_len = make_inputs(lengths, heads, head_dim, dtype, device)
    scale = kwargs.get("softmax_scale")
    grad = torch.randn_like(q)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = omnivmed_ext.rope_attention(*ins, pos, cu, max_len, sections, **kwargs)
    out.backward(grad)
    ref64_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref64 = rope_attention_reference(*ref64_in, pos, cu, sections, softmax_scale=scale)
    ref64.backward(grad.double())
    low_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low = rope_attention_reference(
        *low_in, pos, cu, sections, softmax_scale=scale, compute_dtype=dtype
    )
    low.backward(grad)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert err(out, ref64) <= 2 * err(low, ref64) + atol
    for name, got, want, lp in zip("qkv", ins, ref64_in, low_in, strict=True):
        assert err(got.grad, want.grad) <= 3 * err(lp.grad, want.grad) + atol, f"d{name}"


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype_index", [0, 1])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("with_t", [True, False])
def test_matches_float64_reference(impl, dtype_index, head_dim, layout, with_t):
    device, backend = impl
    dtype = IMPL_DTYPES[backend][dtype_index]
    lengths = LAYOUTS[layout]
    if device == "cpu" and layout == "1025" and head_dim != 128:
        lengths = [257]  # keep the CPU suite fast; 1025 runs at head dim 128
    check_against_reference(lengths, 2, head_dim, dtype, device, sections_for(head_dim, with_t))


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_many_heads_scale_and_long_items(impl):
    device, backend = impl
    dtype = IMPL_DTYPES[backend][1]
    lengths = [300, 1, 2050] if device == "cuda" else [300, 1, 513]
    check_against_reference(lengths, 5, 80, dtype, device, (10, 15, 15), softmax_scale=0.3)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_log_sum_exp(impl):
    device, backend = impl
    dtype = IMPL_DTYPES[backend][1]
    lengths = [7, 130, 65]
    q, k, v, pos, cu, m = make_inputs(lengths, 3, 72, dtype, device)
    sections = sections_for(72, True)
    out, lse = torch.ops.omnivmed.rope_attention_forward(q, k, v, pos, cu, m, sections, 1e4, None)
    assert lse.shape == (3, q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(out, omnivmed_ext.rope_attention(q, k, v, pos, cu, m, sections))
    rq = rope_nd_reference(q.double(), pos, sections)
    rk = rope_nd_reference(k.double(), pos, sections)
    for a, b in itertools.pairwise(cu.tolist()):
        scores = torch.einsum("qhd,khd->hqk", rq[a:b], rk[a:b]) / math.sqrt(72)
        torch.testing.assert_close(lse[:, a:b].double(), scores.logsumexp(-1), atol=2e-2, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_items_do_not_attend_to_each_other(device):
    q, k, v, pos, cu, m = make_inputs([5, 7], 2, 64, torch.float32, device)
    both = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, (8, 12, 12))
    first = omnivmed_ext.rope_attention(q[:5], k[:5], v[:5], pos[:5], cu[:2], 5, (8, 12, 12))
    torch.testing.assert_close(both[:5], first)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_opcheck_and_compile(impl):
    device, backend = impl
    dtype = IMPL_DTYPES[backend][0]
    q, k, v, pos, cu, m = make_inputs([3, 6], 2, 64, dtype, device)
    sections = [8, 12, 12]
    forward = torch.ops.omnivmed.rope_attention_forward.default
    torch.library.opcheck(forward, (q, k, v, pos, cu, m, sections, 10000.0, None))
    torch.library.opcheck(
        forward, (q.clone().requires_grad_(), k, v, pos, cu, m + 4, sections, 500.0, 0.2)
    )
    out, lse = forward(q, k, v, pos, cu, m, sections, 10000.0, None)
    torch.library.opcheck(
        torch.ops.omnivmed.rope_attention_backward.default,
        (torch.randn_like(q), q, k, v, out, lse, pos, cu, m, sections, 10000.0, None),
    )
    torch.library.opcheck(
        torch.ops.omnivmed.rope_attention.default, (q, k, v, pos, cu, m, sections, 1e4, None)
    )

    def block(q, k, v):
        return omnivmed_ext.rope_attention(q * 2, k, v, pos, cu, m, sections).float().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    a = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    block(*a).backward()
    compiled(*b).backward()
    for x, y in zip(a, b, strict=True):
        # The fused backward adds dq with atomics: equal up to summation order.
        torch.testing.assert_close(
            y.grad, x.grad, atol=1e-5 if backend != "fused" else 2e-3, rtol=0
        )


@pytest.mark.cuda
def test_fused_is_sync_free_and_ignores_max_seqlen_for_correctness():
    lengths = [700, 3, 129]
    with omnivmed_ext.attention.use_cuda_backend("fused"):
        q, k, v, pos, cu, _ = make_inputs(lengths, 2, 80, torch.bfloat16, "cuda")
        sections = sections_for(80, True)
        grad = torch.randn_like(q)
        results = []
        for max_seqlen in (700, 4096, 64):  # exact, an upper bound, and too small
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = omnivmed_ext.rope_attention(
                    *ins, pos, cu, max_seqlen, sections, check_seqlens=False
                )
                out.backward(grad)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            results.append((out, *(t.grad for t in ins)))
        for other in results[1:]:
            for x, y in zip(results[0], other, strict=True):
                torch.testing.assert_close(x, y, atol=2e-2, rtol=0)


@pytest.mark.cuda
def test_fused_forward_and_backward_capture_in_a_cuda_graph():
    q, k, v, pos, cu, m = make_inputs([100, 33], 2, 64, torch.float16, "cuda")
    sections = sections_for(64, False)
    args = (pos, cu, m, sections, 1e4, None)
    eager_out, eager_lse = torch.ops.omnivmed._rope_attention_fused_forward(q, k, v, *args)
    grad = torch.randn_like(q)
    eager_grads = torch.ops.omnivmed._rope_attention_fused_backward(
        grad, q, k, v, eager_out, eager_lse, *args
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        torch.ops.omnivmed._rope_attention_fused_forward(q, k, v, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.omnivmed._rope_attention_fused_forward(q, k, v, *args)
        grads = torch.ops.omnivmed._rope_attention_fused_backward(grad, q, k, v, out, lse, *args)
    graph.replay()
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, eager_lse, atol=0, rtol=0)
    for x, y in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=0)


@pytest.mark.cuda
def test_fused_matches_composite_on_a_vision_pack():
    # A pack as the tower sees it: pruned volume and video items of uneven lengths.
    lengths = [1024, 976, 228, 1, 4096, 256]
    q, k, v, pos, cu, m = make_inputs(lengths, 16, 72, torch.bfloat16, "cuda")
    sections = sections_for(72, True)
    with omnivmed_ext.attention.use_cuda_backend("fused"):
        fused = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, sections)
    with omnivmed_ext.attention.use_cuda_backend("composite"):
        composite = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, sections)
    torch.testing.assert_close(fused.float(), composite.float(), atol=2e-2, rtol=0)


@pytest.mark.cuda
def test_fused_op_rejects_what_it_cannot_run():
    q, k, v, pos, cu, m = make_inputs([4, 4], 2, 64, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.omnivmed._rope_attention_fused_forward(q, k, v, pos, cu, m, [8, 12, 12])
    h = q.half()[:, :, :48].contiguous()
    with pytest.raises(RuntimeError, match="head dim 48 is not supported"):
        torch.ops.omnivmed._rope_attention_fused_forward(h, h, h, pos, cu, m, [6, 9, 9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["many items", "1025"])
def test_composite_backward_against_float64(dtype, layout, monkeypatch):
    # The composite CUDA backward is plain tensor math, so it runs on the CPU too; a tiny
    # score budget forces the query-chunk loop.
    monkeypatch.setattr(omnivmed_ext.attention, "_COMPOSITE_SCORES", 3 * 97)
    lengths = LAYOUTS[layout]
    q, k, v, pos, cu, m = make_inputs(lengths, 3, 72, dtype, "cpu")
    sections = sections_for(72, True)
    grad = torch.randn_like(q)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rope_attention_reference(*ref_in, pos, cu, sections)
    ref.backward(grad.double())
    low_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low = rope_attention_reference(*low_in, pos, cu, sections, compute_dtype=dtype)
    low.backward(grad)
    got = omnivmed_ext.attention._backward_composite(
        grad, q, k, v, ref.to(dtype), pos, cu, m, sections, 1e4, None
    )
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, g, want, lp in zip("qkv", got, ref_in, low_in, strict=True):
        assert g.dtype == dtype
        assert err(g, want.grad) <= 3 * err(lp.grad, want.grad) + atol, f"d{name}"


@pytest.mark.cuda
@pytest.mark.parametrize("forward_backend", ["fused", "composite"])
def test_backward_follows_the_forward_backend(forward_backend):
    # Selecting another backend between forward and backward must not mix them: a fused
    # forward gets the (sync-free) fused backward, a composite one the composite backward.
    q, k, v, pos, cu, m = make_inputs([300, 41], 2, 64, torch.bfloat16, "cuda")
    sections = sections_for(64, True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with omnivmed_ext.attention.use_cuda_backend(forward_backend):
        out = omnivmed_ext.rope_attention(*ins, pos, cu, m, sections, check_seqlens=False)
    other = "composite" if forward_backend == "fused" else "fused"
    with omnivmed_ext.attention.use_cuda_backend(other):
        torch.cuda.synchronize()
        # The composite backward reads the offsets on the host; the fused one never does.
        torch.cuda.set_sync_debug_mode("error")
        try:
            if forward_backend == "fused":
                out.backward(torch.ones_like(out))
            else:
                with pytest.raises(RuntimeError, match="synchroniz"):
                    out.backward(torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_backend_selection():
    assert omnivmed_ext.attention.cuda_backend() in omnivmed_ext.attention.CUDA_BACKENDS
    with pytest.raises(ValueError, match="must be one of"):
        omnivmed_ext.attention.set_cuda_backend("flash")
    before = omnivmed_ext.attention.cuda_backend()
    with omnivmed_ext.attention.use_cuda_backend("fused"):
        assert omnivmed_ext.attention.cuda_backend() == "fused"
    assert omnivmed_ext.attention.cuda_backend() == before


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
