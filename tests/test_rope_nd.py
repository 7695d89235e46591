"""rope_nd: the op against a float64 reference, gradients, opcheck, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import omnivmed_ext
from omnivmed_ext.reference import rope_frequency_table, rope_nd_reference

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 72, 80, 128]
LENGTHS = [1, 97, 1025]


def section_splits(head_dim: int) -> list[tuple[int, ...]]:
    """Splits of D/2 pairs over 1 to 4 axes, including uneven ones and an empty axis."""
    half = head_dim // 2
    quarter = half // 4
    return [
        (half,),
        (half // 2, half - half // 2),
        (quarter, (half - quarter) // 2, half - quarter - (half - quarter) // 2),
        (1, 3, half - 9, 5),
        (0, half // 3, half - half // 3),
    ]


def random_positions(length: int, axes: int, device: str, dtype=torch.int32) -> torch.Tensor:
    # Frame/slice indices are small, grid indices larger; some far positions stress the
    # fp32 angle, and negative ones are valid too.
    pos = torch.randint(-64, 2048, (length, axes), dtype=torch.int64)
    return pos.to(device=device, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def atol_for(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("length", LENGTHS)
def test_forward_and_backward_match_float64_reference(device, dtype, head_dim, length):
    heads = 3
    for sections in section_splits(head_dim):
        x = torch.randn(length, heads, head_dim, device=device, dtype=dtype)
        pos = random_positions(length, len(sections), device)
        grad_out = torch.randn_like(x)

        x_op = x.clone().requires_grad_()
        out = omnivmed_ext.rope_nd(x_op, pos, sections)
        out.backward(grad_out)

        x64 = x.double().requires_grad_()
        ref64 = rope_nd_reference(x64, pos, sections)
        ref64.backward(grad_out.double())

        # The same computation in PyTorch at the input's precision sets the error budget.
        x_lp = x.clone().requires_grad_()
        ref_lp = rope_nd_reference(x_lp, pos, sections)
        ref_lp.backward(grad_out)

        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        fwd_budget = 2 * max_err(ref_lp, ref64) + atol_for(dtype)
        assert max_err(out, ref64) <= fwd_budget, sections
        bwd_budget = 3 * max_err(x_lp.grad, x64.grad) + atol_for(dtype)
        assert max_err(x_op.grad, x64.grad) <= bwd_budget, sections


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_float64_inputs_are_exact_to_rounding(device, pos_dtype):
    sections = (4, 16, 16)
    x = torch.randn(257, 5, 72, device=device, dtype=torch.float64)
    pos = random_positions(257, 3, device, pos_dtype)
    out = omnivmed_ext.rope_nd(x, pos, sections)
    torch.testing.assert_close(out, rope_nd_reference(x, pos, sections), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_undoes_forward(device):
    sections = (8, 12, 12)
    x = torch.randn(97, 4, 64, device=device)
    pos = random_positions(97, 3, device)
    there = omnivmed_ext.rope_nd(x, pos, sections)
    back = omnivmed_ext.rope_nd(there, pos, sections, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(there, x)


@pytest.mark.parametrize("device", DEVICES)
def test_known_rotation_by_hand(device):
    # One pair per axis: pair 0 of each axis has inverse frequency 1, so it turns by the
    # position itself; (1, 0) rotated by t is (cos t, sin t).
    x = torch.zeros(1, 1, 6, device=device, dtype=torch.float64)
    x[0, 0, :3] = 1.0
    pos = torch.tensor([[0, 1, 2]], device=device)
    out = omnivmed_ext.rope_nd(x, pos, (1, 1, 1))
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    expected = torch.cat((t.cos(), t.sin())).view(1, 1, 6).to(device)
    torch.testing.assert_close(out, expected)


def test_frequency_table_follows_the_contract():
    inv_freq, axis = rope_frequency_table((2, 3), theta=100.0)
    expected = torch.tensor([1.0, 100 ** (-1 / 2), 1.0, 100 ** (-1 / 3), 100 ** (-2 / 3)])
    torch.testing.assert_close(inv_freq, expected.double())
    assert axis.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    sections = (4, 16, 16)
    length, heads, head_dim = 97, 4, 72
    qkv = torch.randn(length, 3, heads, head_dim, device=device, dtype=dtype)
    head_major = torch.randn(heads, length, head_dim, device=device, dtype=dtype)
    wide = torch.randn(length, heads, 2 * head_dim, device=device, dtype=dtype)
    offset = torch.randn(length * heads * head_dim + 1, device=device, dtype=dtype)
    views = {
        "slice of packed qkv": qkv[:, 1],
        "transposed": head_major.transpose(0, 1),
        "strided channels": wide[:, :, ::2],
        "misaligned start": offset[1:].view(length, heads, head_dim),
    }
    pos_wide = random_positions(length, 6, device)
    pos_views = {
        "contiguous": pos_wide[:, :3].contiguous(),
        "strided": pos_wide[:, ::2],
        "column-major": pos_wide[:, :3].t().contiguous().t(),
    }
    for x_name, x in views.items():
        for p_name, pos in pos_views.items():
            out = omnivmed_ext.rope_nd(x, pos, sections)
            expected = omnivmed_ext.rope_nd(x.contiguous(), pos.contiguous(), sections)
            assert out.is_contiguous()
            torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"{x_name}, {p_name}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    sections = (1, 2, 1)
    x = torch.randn(7, 2, 8, device=device, dtype=torch.float64, requires_grad=True)
    pos = random_positions(7, 3, device)
    assert torch.autograd.gradcheck(lambda t: omnivmed_ext.rope_nd(t, pos, sections), (x,))
    assert torch.autograd.gradgradcheck(lambda t: omnivmed_ext.rope_nd(t, pos, sections), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = torch.ops.omnivmed.rope_nd.default
    samples = [
        (
            torch.randn(9, 2, 8, device=device, requires_grad=True),
            random_positions(9, 2, device),
            [2, 2],
            10000.0,
            False,
        ),
        (
            torch.randn(5, 3, 72, device=device, dtype=torch.bfloat16),
            random_positions(5, 3, device, torch.int64),
            [4, 16, 16],
            500.0,
            True,
        ),
        (
            torch.randn(4, 6, 2, 16, device=device, requires_grad=True)[:, ::2, 1],
            random_positions(4, 4, device),
            [1, 2, 3, 2],
            10000.0,
            False,
        ),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    sections = (4, 16, 16)

    def block(x, pos):
        return omnivmed_ext.rope_nd(x * 2.0, pos, sections).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    for length in (33, 97):
        x = torch.randn(length, 2, 72, device=device)
        pos = random_positions(length, 3, device)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = block(xa, pos), compiled(xb, pos)
        ya.backward()
        yb.backward()
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    sections = (8, 24)

    def block(x, pos):
        return omnivmed_ext.rope_nd(x + 1.0, pos, sections) * 3.0

    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(65, 2, 64)
    pos = random_positions(65, 2, "cpu")
    torch.testing.assert_close(compiled(x, pos), block(x, pos))


BAD_INPUTS = [
    (
        "odd head dim",
        lambda: (torch.randn(4, 2, 7), torch.zeros(4, 1, dtype=torch.int32), [3]),
        ValueError,
        "must be even",
    ),
    (
        "head dim too large",
        lambda: (torch.randn(4, 1, 258), torch.zeros(4, 1, dtype=torch.int32), [129]),
        ValueError,
        "must be even and in",
    ),
    (
        "sections do not sum to D/2",
        lambda: (torch.randn(4, 2, 8), torch.zeros(4, 2, dtype=torch.int32), [2, 3]),
        ValueError,
        "must sum to D/2 = 4",
    ),
    (
        "negative section",
        lambda: (torch.randn(4, 2, 8), torch.zeros(4, 2, dtype=torch.int32), [5, -1]),
        ValueError,
        "non-negative",
    ),
    (
        "five axes",
        lambda: (torch.randn(4, 2, 10), torch.zeros(4, 5, dtype=torch.int32), [1] * 5),
        ValueError,
        "1 to 4 axes",
    ),
    (
        "no axis",
        lambda: (torch.randn(4, 2, 8), torch.zeros(4, 0, dtype=torch.int32), []),
        ValueError,
        "1 to 4 axes",
    ),
    (
        "positions rows",
        lambda: (torch.randn(4, 2, 8), torch.zeros(5, 2, dtype=torch.int32), [2, 2]),
        ValueError,
        r"positions must be \[L, A\] = \[4, 2\]",
    ),
    (
        "positions columns",
        lambda: (torch.randn(4, 2, 8), torch.zeros(4, 3, dtype=torch.int32), [2, 2]),
        ValueError,
        r"positions must be \[L, A\]",
    ),
    (
        "positions float",
        lambda: (torch.randn(4, 2, 8), torch.zeros(4, 2), [2, 2]),
        TypeError,
        "int32 or int64",
    ),
    (
        "x integer",
        lambda: (
            torch.zeros(4, 2, 8, dtype=torch.int32),
            torch.zeros(4, 2, dtype=torch.int32),
            [2, 2],
        ),
        TypeError,
        "float32, float16, bfloat16 or float64",
    ),
    (
        "x two-dimensional",
        lambda: (torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), [2, 2]),
        ValueError,
        r"x must be \[L, H, D\]",
    ),
]


@pytest.mark.parametrize("name,make,exc,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["python", "dispatcher"])
def test_bad_input_is_rejected_clearly(name, make, exc, message, entry):
    x, pos, sections = make()
    # "dispatcher": the compiled op's own checks, for callers that bypass the wrapper.
    call = omnivmed_ext.rope_nd if entry == "python" else torch.ops.omnivmed.rope_nd.default
    with pytest.raises(exc, match=message):
        call(x, pos, sections, 10000.0, False)


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_theta(theta):
    x, pos = torch.randn(3, 1, 4), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="theta must be a positive finite number"):
        omnivmed_ext.rope_nd(x, pos, [2], theta)
    with pytest.raises(ValueError, match="theta must be a positive finite number"):
        torch.ops.omnivmed.rope_nd.default(x, pos, [2], theta, False)


def test_mismatched_devices():
    x = torch.randn(3, 1, 4)
    pos = torch.zeros(3, 1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="same device"):
        omnivmed_ext.rope_nd(x, pos, [2])


@pytest.mark.cuda
def test_mismatched_devices_cuda():
    x = torch.randn(3, 1, 4, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        omnivmed_ext.rope_nd(x, torch.zeros(3, 1, dtype=torch.int32), [2])
    with pytest.raises(ValueError, match="same device"):
        torch.ops.omnivmed.rope_nd.default(x, torch.zeros(3, 1, dtype=torch.int32), [2], 1e4, False)


def test_empty_inputs():
    out = omnivmed_ext.rope_nd(torch.randn(0, 2, 8), torch.zeros(0, 2, dtype=torch.int32), [2, 2])
    assert out.shape == (0, 2, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
@pytest.mark.parametrize("head_dim", [2, 8, 64, 72, 80, 96, 128, 256])
def test_cuda_matches_cpu_kernel(dtype, head_dim):
    # Same math header on both sides: fp32 results agree to a few ulps of the output type.
    sections = (head_dim // 2,) if head_dim < 8 else (1, head_dim // 4 - 1, head_dim // 4)
    x = torch.randn(1000, 5, head_dim, dtype=dtype)
    pos = random_positions(1000, len(sections), "cpu")
    cpu = omnivmed_ext.rope_nd(x, pos, sections)
    gpu = omnivmed_ext.rope_nd(x.cuda(), pos.cuda(), sections).cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(gpu, cpu, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_large_input_every_element_written():
    length, heads, head_dim = 65536 + 17, 16, 80
    sections = (8, 16, 16)
    x = torch.randn(length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    pos = random_positions(length, 3, "cuda")
    out = omnivmed_ext.rope_nd(x, pos, sections)
    assert torch.isfinite(out).all()
    ref = rope_nd_reference(x, pos, sections)
    assert max_err(out, ref) <= 2 * 2**-8 * ref.abs().max().item()
