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
    pytest.param(("cuda", "flash"), id="cuda-flash", marks=pytest.mark.cuda),
]
IMPL_DTYPES = {
    None: [torch.float32, torch.bfloat16],
    "composite": [torch.float32, torch.bfloat16],
    "fused": [torch.float16, torch.bfloat16],
    "flash": [torch.float16, torch.bfloat16],
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
            y.grad, x.grad, atol=1e-5 if backend in (None, "composite") else 2e-3, rtol=0
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
@pytest.mark.parametrize("forward_backend", ["fused", "composite", "flash"])
def test_backward_follows_the_forward_backend(forward_backend):
    # Selecting another backend between forward and backward must not mix them: a fused or
    # flash forward gets its own (sync-free) backward, a composite one the composite one.
    q, k, v, pos, cu, m = make_inputs([300, 41], 2, 64, torch.bfloat16, "cuda")
    sections = sections_for(64, True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with omnivmed_ext.attention.use_cuda_backend(forward_backend):
        out = omnivmed_ext.rope_attention(*ins, pos, cu, m, sections, check_seqlens=False)
    other = "fused" if forward_backend == "composite" else "composite"
    with omnivmed_ext.attention.use_cuda_backend(other):
        torch.cuda.synchronize()
        # The composite backward reads the offsets on the host; the others never do.
        torch.cuda.set_sync_debug_mode("error")
        try:
            if forward_backend != "composite":
                out.backward(torch.ones_like(out))
            else:
                with pytest.raises(RuntimeError, match="synchroniz"):
                    out.backward(torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_backend_selection():
    assert omnivmed_ext.attention.cuda_backend() in omnivmed_ext.attention.CUDA_BACKENDS
    assert omnivmed_ext.attention.DEFAULT_CUDA_BACKEND == "flash"
    with pytest.raises(ValueError, match="must be one of"):
        omnivmed_ext.attention.set_cuda_backend("flash2")
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


# --- the flash backend: rope_nd + torch's varlen_attn ----------------------------------


def meta_inputs(total, items, dtype=torch.bfloat16):
    q = torch.empty(total, 16, 72, dtype=dtype, device="meta")
    return q, torch.empty(items + 1, dtype=torch.int32, device="meta")


@pytest.mark.parametrize(
    ("backend", "dtype", "total", "items", "path"),
    [
        ("flash", torch.bfloat16, 64 * 729, 64, "varlen"),
        ("flash", torch.float16, 4 * 8192, 4, "varlen"),
        ("flash", torch.bfloat16, 32768, 1, "sdpa"),  # one long item: SDPA
        ("flash", torch.bfloat16, 16384, 1, "sdpa"),
        ("flash", torch.bfloat16, 16383, 1, "varlen"),
        ("flash", torch.bfloat16, 32768 + 729, 2, "varlen"),  # long among others: the pack
        ("flash", torch.float32, 729, 1, "composite"),  # float32 always takes the composite
        ("fused", torch.bfloat16, 32768, 1, "fused"),
        ("composite", torch.bfloat16, 729, 1, "composite"),
    ],
)
def test_cuda_path_rule(backend, dtype, total, items, path):
    q, cu = meta_inputs(total, items, dtype)
    with omnivmed_ext.attention.use_cuda_backend(backend):
        assert omnivmed_ext.attention.cuda_path(q, cu) == path


def test_flash_path_reads_only_shapes():
    # Meta tensors hold no values: deciding must not need any.
    q, cu = meta_inputs(40000, 1)
    assert omnivmed_ext.attention.cuda_path(q, cu) in ("sdpa", "varlen", "composite", "fused")
    limit = omnivmed_ext.attention.LONG_ITEM_TOKENS
    assert omnivmed_ext.attention.flash_path(1, limit) == "sdpa"
    assert omnivmed_ext.attention.flash_path(1, limit - 1) == "varlen"
    assert omnivmed_ext.attention.flash_path(3, 10 * limit) == "varlen"


class CpuVarlen:
    """CPU stand-ins for torch's varlen_attn and SDPA entry points: per-item CPU flash
    attention, recording what the flash backend hands them."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _items(cu, total):
        bounds = cu.tolist()
        assert bounds[0] == 0 and bounds[-1] == total
        return list(itertools.pairwise(bounds))

    def forward(self, rq, rk, v, cu, max_seqlen, scale):
        self.calls.append(("varlen forward", int(max_seqlen), scale))
        assert cu.dtype == torch.int32 and rq.is_contiguous() and rk.is_contiguous()
        out = torch.empty_like(rq)
        lse = rq.new_empty((rq.shape[1], rq.shape[0]), dtype=torch.float32)
        for a, b in self._items(cu, rq.shape[0]):
            assert b - a <= max_seqlen
            if b > a:
                o, item_lse = omnivmed_ext.attention._cpu_flash_item(
                    *(x[a:b].transpose(0, 1)[None] for x in (rq, rk, v)), scale
                )
                out[a:b], lse[:, a:b] = o[0].transpose(0, 1), item_lse[0]
        return out, lse

    def backward(self, grad, rq, rk, v, out, lse, cu, max_seqlen, scale):
        self.calls.append(("varlen backward", int(max_seqlen), scale))
        grads = [torch.zeros_like(x) for x in (rq, rk, v)]
        for a, b in self._items(cu, rq.shape[0]):
            if b > a:
                item = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    *(x[a:b].transpose(0, 1)[None].contiguous() for x in (grad, rq, rk, v, out)),
                    lse[:, a:b][None].contiguous(), 0.0, False, scale=scale,
                )  # fmt: skip
                for dst, src in zip(grads, item, strict=True):
                    dst[a:b] = src[0].transpose(0, 1)
        return tuple(grads)

    def sdpa_forward(self, rq, rk, v, scale):
        self.calls.append(("sdpa forward", rq.shape[0], scale))
        cu = torch.tensor([0, rq.shape[0]], dtype=torch.int32)
        result = self.forward(rq, rk, v, cu, rq.shape[0], scale)
        self.calls.pop()  # recorded as the SDPA call above
        return result

    def sdpa_backward(self, grad, rq, rk, v, out, lse, scale):
        self.calls.append(("sdpa backward", rq.shape[0], scale))
        cu = torch.tensor([0, rq.shape[0]], dtype=torch.int32)
        result = self.backward(grad, rq, rk, v, out, lse, cu, rq.shape[0], scale)
        self.calls.pop()
        return result


@pytest.fixture
def cpu_varlen(monkeypatch):
    stand_in = CpuVarlen()
    attention = omnivmed_ext.attention
    monkeypatch.setattr(attention, "_varlen_forward", stand_in.forward)
    monkeypatch.setattr(attention, "_varlen_backward", stand_in.backward)
    monkeypatch.setattr(attention, "_sdpa_forward", stand_in.sdpa_forward)
    monkeypatch.setattr(attention, "_sdpa_backward", stand_in.sdpa_backward)
    return stand_in


def flash_against_reference(lengths, max_seqlen, dtype, softmax_scale=None):
    # The flash backend's own code (rotation, scale, offsets, log-sum-exp layout, the
    # inverse rotation of dq and dk) on the CPU, around the stand-in kernels.
    attention = omnivmed_ext.attention
    q, k, v, pos, cu, _ = make_inputs(lengths, 3, 72, dtype, "cpu")
    sections = sections_for(72, True)
    grad = torch.randn_like(q)
    out, lse = attention._flash_forward(q, k, v, pos, cu, max_seqlen, sections, 1e4, softmax_scale)
    got = attention._flash_backward(
        grad, q, k, v, out, lse, pos, cu, max_seqlen, sections, 1e4, softmax_scale
    )
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rope_attention_reference(*ref_in, pos, cu, sections, softmax_scale=softmax_scale)
    ref.backward(grad.double())
    low_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low = rope_attention_reference(
        *low_in, pos, cu, sections, softmax_scale=softmax_scale, compute_dtype=dtype
    )
    low.backward(grad)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert out.shape == q.shape and lse.shape == (3, q.shape[0])
    assert err(out, ref) <= 2 * err(low, ref) + atol
    for name, g, want, lp in zip("qkv", got, ref_in, low_in, strict=True):
        assert g.shape == q.shape and g.dtype == dtype
        assert err(g, want.grad) <= 3 * err(lp.grad, want.grad) + atol, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["one token", "97", "many items"])
def test_flash_packing_against_float64(cpu_varlen, dtype, layout):
    lengths = LAYOUTS[layout]
    flash_against_reference(lengths, max(lengths), dtype)
    # One varlen call over the whole pack each way, with the host-side max length.
    assert cpu_varlen.calls == [
        ("varlen forward", max(lengths), 1 / math.sqrt(72)),
        ("varlen backward", max(lengths), 1 / math.sqrt(72)),
    ]


def test_flash_packing_with_empty_items_and_an_upper_bound(cpu_varlen):
    flash_against_reference([0, 5, 0, 33, 1, 0], 64, torch.float32, softmax_scale=0.3)
    assert [c[1] for c in cpu_varlen.calls] == [64, 64]
    assert all(c[2] == 0.3 for c in cpu_varlen.calls)


def test_flash_long_single_item_takes_sdpa(cpu_varlen, monkeypatch):
    monkeypatch.setattr(omnivmed_ext.attention, "LONG_ITEM_TOKENS", 200)
    flash_against_reference([257], 257, torch.float32)
    assert [c[0] for c in cpu_varlen.calls] == ["sdpa forward", "sdpa backward"]
    cpu_varlen.calls.clear()
    flash_against_reference([257, 3], 257, torch.float32)  # not alone: varlen
    assert [c[0] for c in cpu_varlen.calls] == ["varlen forward", "varlen backward"]


def test_flash_ops_fake_kernels():
    # The flash ops' meta functions (what torch.compile sees) give the documented shapes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    *real, m = make_inputs([5, 7], 2, 64, torch.bfloat16, "cpu")
    mode = FakeTensorMode()
    q, k, v, pos, cu = (mode.from_tensor(t) for t in real)
    with mode:
        out, lse = torch.ops.omnivmed._rope_attention_flash_forward(
            q, k, v, pos, cu, m, [8, 12, 12], 1e4, None
        )
        grads = torch.ops.omnivmed._rope_attention_flash_backward(
            torch.empty_like(q), q, k, v, out, lse, pos, cu, m, [8, 12, 12], 1e4, None
        )
    assert out.shape == q.shape and lse.shape == (2, 12) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape] * 3


FLASH_LAYOUTS = {
    "one token": [1],
    "97": [97],
    "1025": [1025],
    "many items": [1, 17, 97, 5, 64, 33] * 20,
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("layout", sorted(FLASH_LAYOUTS))
def test_flash_matches_float64_reference(dtype, head_dim, layout):
    with omnivmed_ext.attention.use_cuda_backend("flash"):
        check_against_reference(
            FLASH_LAYOUTS[layout], 4, head_dim, dtype, "cuda", sections_for(head_dim, True)
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_long_single_item_sdpa_path(dtype, monkeypatch):
    # The SDPA path for a pack of one long item, made reachable at a testable size.
    monkeypatch.setattr(omnivmed_ext.attention, "LONG_ITEM_TOKENS", 1000)
    q, _ = meta_inputs(1025, 1)
    with omnivmed_ext.attention.use_cuda_backend("flash"):
        assert omnivmed_ext.attention.cuda_path(q.to(dtype), _) == "sdpa"
        check_against_reference([1025], 3, 72, dtype, "cuda", sections_for(72, True))
        check_against_reference([1025], 2, 128, dtype, "cuda", sections_for(128, False),
                                softmax_scale=0.2)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("long_item", [False, True])
def test_flash_is_sync_free_and_capturable(long_item, monkeypatch):
    if long_item:
        monkeypatch.setattr(omnivmed_ext.attention, "LONG_ITEM_TOKENS", 100)
    lengths = [133] if long_item else [100, 0, 33, 1]
    q, k, v, pos, cu, m = make_inputs(lengths, 2, 64, torch.bfloat16, "cuda")
    args = (pos, cu, m, sections_for(64, True), 1e4, None)
    forward = torch.ops.omnivmed._rope_attention_flash_forward
    backward = torch.ops.omnivmed._rope_attention_flash_backward
    grad = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager_out, eager_lse = forward(q, k, v, *args)
        eager_grads = backward(grad, q, k, v, eager_out, eager_lse, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        backward(grad, q, k, v, *forward(q, k, v, *args), *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = forward(q, k, v, *args)
        grads = backward(grad, q, k, v, out, lse, *args)
    graph.replay()
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, eager_lse, atol=0, rtol=0)
    for x, y in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=0)


@pytest.mark.cuda
def test_flash_opcheck():
    q, k, v, pos, cu, m = make_inputs([3, 60, 1], 2, 80, torch.bfloat16, "cuda")
    sections = sections_for(80, True)
    forward = torch.ops.omnivmed._rope_attention_flash_forward.default
    torch.library.opcheck(forward, (q, k, v, pos, cu, m, sections, 1e4, None))
    out, lse = forward(q, k, v, pos, cu, m, sections, 1e4, 0.3)
    torch.library.opcheck(
        torch.ops.omnivmed._rope_attention_flash_backward.default,
        (torch.randn_like(q), q, k, v, out, lse, pos, cu, m, sections, 1e4, 0.3),
    )


@pytest.mark.cuda
def test_flash_matches_fused_on_a_vision_pack():
    lengths = [1024, 976, 228, 1, 4096, 256]
    q, k, v, pos, cu, m = make_inputs(lengths, 16, 72, torch.bfloat16, "cuda")
    sections = sections_for(72, True)
    with omnivmed_ext.attention.use_cuda_backend("flash"):
        flash = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, sections)
    with omnivmed_ext.attention.use_cuda_backend("fused"):
        fused = omnivmed_ext.rope_attention(q, k, v, pos, cu, m, sections)
    torch.testing.assert_close(flash.float(), fused.float(), atol=2e-2, rtol=0)


# --- one owner per op: the C++ library's CPU kernels, Python's per-call CUDA choice ------


def previous_python_cpu_path(grad, q, k, v, pos, cu, sections, scale):
    """The CPU path as it was written in Python before it moved into the C++ library:
    rope_nd, then torch's CPU flash attention one item at a time, forward and backward."""

    def rotate(x, inverse=False):
        return torch.ops.omnivmed.rope_nd(x, pos, sections, 1e4, inverse)

    def heads_first(x):
        return x.transpose(0, 1).unsqueeze(0)

    rq, rk = rotate(q), rotate(k)
    out = torch.zeros_like(q)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    items = [(a, b) for a, b in itertools.pairwise(cu.tolist()) if b > a]
    for a, b in items:
        o, item_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(heads_first(x[a:b]) for x in (rq, rk, v)), 0.0, False, scale=scale
        )
        out[a:b], lse[:, a:b] = o[0].transpose(0, 1), item_lse[0]
    for a, b in items:
        item = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(heads_first(x[a:b].contiguous()) for x in (grad, rq, rk, v, out)),
            lse[:, a:b].unsqueeze(0).contiguous(), 0.0, False, scale=scale,
        )  # fmt: skip
        for dst, src in zip(grads, item, strict=True):
            dst[a:b] = src[0].transpose(0, 1)
    return out, lse, (rotate(grads[0], True), rotate(grads[1], True), grads[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths",
    [[1], [97], [0, 5, 5, 5, 0, 33, 33, 1], [196] * 6 + [17, 300, 300]],
    ids=["one token", "97", "empty and repeated", "images"],
)
def test_cpu_op_equals_the_previous_python_path(dtype, lengths):
    # Runs of equal-length items go to ATen as one batch: the numbers must not change.
    q, k, v, pos, cu, m = make_inputs(lengths, 3, 72, dtype, "cpu")
    sections = sections_for(72, True)
    grad = torch.randn_like(q)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.omnivmed.rope_attention_forward(*ins, pos, cu, m, sections, 1e4, 0.2)
    out.backward(grad)
    want_out, want_lse, want_grads = previous_python_cpu_path(grad, q, k, v, pos, cu, sections, 0.2)
    tight = (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5}
    )
    torch.testing.assert_close(out, want_out, **tight)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
    for got, want in zip((t.grad for t in ins), want_grads, strict=True):
        torch.testing.assert_close(got, want, **tight)
    # And both against float64, by the suite's error rule.
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rope_attention_reference(*ref_in, pos, cu, sections, softmax_scale=0.2)
    ref.backward(grad.double())
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert err(out, ref) <= 2 * err(want_out, ref) + atol
    for got, want, previous in zip(ins, ref_in, want_grads, strict=True):
        assert err(got.grad, want.grad) <= 2 * err(previous, want.grad) + atol


def test_cpu_op_opcheck_with_empty_items_and_runs():
    q, k, v, pos, cu, m = make_inputs([0, 4, 4, 4, 1, 0, 9], 2, 64, torch.float32, "cpu")
    sections = [8, 12, 12]
    forward = torch.ops.omnivmed.rope_attention_forward.default
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, pos, cu, m, sections, 1e4, None))
    out, lse = forward(q.detach(), k, v, pos, cu, m, sections, 1e4, None)
    torch.library.opcheck(
        torch.ops.omnivmed.rope_attention_backward.default,
        (torch.randn_like(q), q.detach(), k, v, out, lse, pos, cu, m, sections, 1e4, None),
    )


def test_every_op_has_a_cpu_kernel_or_is_documented_cuda_only():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("omnivmed::")]
    for op in ("rope_nd", "l1_prune", "l1_prune_padded", "rope_attention", "rope_attention_forward",
               "rope_attention_backward"):  # fmt: skip
        assert f"omnivmed::{op}" in names
    cuda_only = {f"omnivmed::{n}" for n in omnivmed_ext.attention.CUDA_ONLY_OPS}
    assert cuda_only <= set(names)
    for name in names:
        has_cpu = any(
            torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            for key in ("CPU", "CompositeImplicitAutograd")
        )
        assert has_cpu != (name in cuda_only), f"{name}: CPU kernel {has_cpu}"
        dump = torch._C._dispatch_dump(name)
        if ".py:" not in dump.splitlines()[2]:  # "debug: registered at <where the schema is>"
            # Declared in C++, so its kernels are C++'s too: none comes from Python.
            # (A CPU-only build has no kernel at all for the CUDA-only ones.)
            kernels = [line for line in dump.splitlines()
                       if line.startswith(("CPU:", "CUDA:", "CompositeImplicitAutograd"))]  # fmt: skip
            assert not any(".py:" in line for line in kernels), dump
    q, k, v, pos, cu, m = make_inputs([4], 2, 64, torch.float16, "cpu")
    with pytest.raises(NotImplementedError, match=r"_rope_attention_fused_forward.*'CPU' backend"):
        torch.ops.omnivmed._rope_attention_fused_forward(q, k, v, pos, cu, m, [8, 12, 12])


def test_cuda_backend_is_chosen_per_call_on_fake_cuda_tensors(monkeypatch):
    # The choice happens in Python above the CUDA kernels and reads shapes only, so fake
    # CUDA tensors show which op each call reaches, with or without a GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("omnivmed::") and name != "omnivmed::rope_nd":
                self.seen.append(name.split("::")[1].replace("_rope_attention_", ""))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(omnivmed_ext.attention, "require_library", lambda *args: None)
    attention = omnivmed_ext.attention
    try:
        mode = FakeTensorMode()
        with mode:
            torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError) as exc:
        pytest.skip(f"no fake CUDA tensors in this torch build: {exc}")
    sections = [8, 12, 12]
    for backend, dtype, path in [
        ("flash", torch.bfloat16, "flash"),
        ("fused", torch.float16, "fused"),
        ("composite", torch.bfloat16, "composite"),
        ("flash", torch.float32, "composite"),
        ("fused", torch.float32, "composite"),
    ]:
        with mode:
            q, k, v = (
                torch.randn(12, 2, 64, dtype=dtype, device="cuda", requires_grad=True)
                for _ in range(3)
            )
            pos = torch.zeros(12, 3, dtype=torch.int32, device="cuda")
            cu = torch.zeros(3, dtype=torch.int32, device="cuda")
            ops = Ops()
            with attention.use_cuda_backend(backend), ops:
                out, lse = torch.ops.omnivmed.rope_attention_forward(
                    q, k, v, pos, cu, 7, sections, 1e4, None
                )
            other = "composite" if backend == "fused" else "fused"
            with attention.use_cuda_backend(other), ops:  # backward: the forward's path
                out.grad_fn.apply(torch.ones_like(out), None)
            with attention.use_cuda_backend(backend), ops:
                with torch.no_grad():
                    torch.ops.omnivmed.rope_attention(q, k, v, pos, cu, 7, sections, 1e4, None)
                detached = [t.detach() for t in (out, q, k, v)]
                torch.ops.omnivmed.rope_attention_backward(
                    detached[0], *detached[1:], detached[0], lse, pos, cu, 7, sections, 1e4, None
                )
                with torch.inference_mode():
                    attention.rope_attention(*detached[1:], pos, cu, 7, sections,
                                             check_seqlens=False)  # fmt: skip
        assert ops.seen == [f"{path}_forward", f"{path}_backward"] * 2 + [f"{path}_forward"], (
            backend,
            dtype,
        )
