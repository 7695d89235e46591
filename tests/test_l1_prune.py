"""l1_prune: the op against the reference, the padded form, round trips, modes, units,
min_keep_per_frame, gradients, opcheck, torch.compile, CUDA graphs and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import omnivmed_ext
from omnivmed_ext.reference import l1_prune_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


def make_items(
    frames_per_item, grid, values, dtype, device, *, noise=0.01, change=4.0, changed_fraction=0.5
):
    """Frames whose successive differences sit far from the test thresholds: exact
    repeats, tiny noise (mean |diff| about `noise`), and patches replaced outright (mean
    |diff| about `change`). uint8 data use the same pattern in 0..255 units."""
    grid_h, grid_w = grid
    n = grid_h * grid_w
    frames = []
    for count in frames_per_item:
        # Noise is drawn around the last real content (`anchor`), never on top of earlier
        # noise, so no drift can build up towards the threshold in mode "last_kept".
        anchor = frame = torch.rand(n, values) * 2 - 1
        frames.append(frame)
        for f in range(1, count):
            kind = f % 3
            if kind == 0:  # an exact repeat
                frame = frame.clone()
            elif kind == 1:  # tiny noise everywhere
                frame = anchor + noise * (torch.rand_like(anchor) * 2 - 1)
            else:  # some patches replaced by new content
                frame = anchor.clone()
                replaced = torch.rand(n) < changed_fraction
                # Shift by `change` (down if shifted before): every value moves by it.
                shift = torch.where(
                    anchor[replaced].mean(1, keepdim=True) > change / 2, -change, change
                )
                frame[replaced] = anchor[replaced] + shift
                anchor = frame
            frames.append(frame)
    x = torch.stack(frames)
    if dtype == torch.uint8:
        x = ((x + 1) * 60).clamp(0, 255).round().to(torch.uint8)
    else:
        x = x.to(dtype)
    cu = torch.tensor([0, *torch.tensor(frames_per_item).cumsum(0).tolist()], dtype=torch.int32)
    return x.to(device), cu.to(device)


def threshold_for(dtype):
    return 10.0 if dtype == torch.uint8 else 0.1


def assert_same_result(result, expected, exact=True):
    for name in ("keep", "index", "positions", "cu_seqlens"):
        assert torch.equal(getattr(result, name).cpu(), getattr(expected, name).cpu()), name
    assert torch.equal(result.values.cpu(), expected.values.cpu())


def assert_well_formed(result, patches, cu_frames, grid):
    frames, n, values = patches.shape
    keep, index = result.keep.cpu(), result.index.cpu()
    assert index.dtype == torch.int64 and result.positions.dtype == torch.int32
    assert result.cu_seqlens.dtype == torch.int32
    assert torch.equal(index, keep.reshape(-1).nonzero().squeeze(1))  # original order
    cu = cu_frames.cpu().tolist()
    for b in range(len(cu) - 1):
        assert keep[cu[b]].all(), "the first frame of every item is kept whole"
    # Positions: true (t, h, w) of each kept token.
    frame_of, patch_of = index // n, index % n
    item_start = torch.tensor([cu[b] for b in range(len(cu) - 1) for _ in range(cu[b + 1] - cu[b])])
    expected_pos = torch.stack(
        (frame_of - item_start[frame_of], patch_of // grid[1], patch_of % grid[1]), 1
    )
    assert torch.equal(result.positions.cpu().long(), expected_pos)
    # cu_seqlens counts each item's kept tokens.
    counts = [int(keep[cu[b] : cu[b + 1]].sum()) for b in range(len(cu) - 1)]
    assert result.cu_seqlens.cpu().tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    # Round trip: scattering the kept values back puts every one in its place.
    restored = torch.zeros(frames * n, values, dtype=patches.dtype)
    restored[index] = result.values.cpu()
    flat = patches.cpu().reshape(-1, values)
    assert torch.equal(restored[index], flat[index])
    assert torch.equal(restored.reshape(frames, n, values)[keep], patches.cpu()[keep])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["previous", "last_kept"])
@pytest.mark.parametrize("unit,grid", [(1, (5, 7)), (2, (4, 6))])
@pytest.mark.parametrize("min_keep", [0, 3])
def test_matches_reference(device, dtype, mode, unit, grid, min_keep):
    values = 3 * 2 * 2 + 1  # odd P
    patches, cu = make_items([1, 7, 1, 4], grid, values, dtype, device)
    threshold = threshold_for(dtype)
    expected, sums = l1_prune_reference(
        patches.cpu(), cu.cpu(), grid, threshold, mode, unit, min_keep, return_sums=True
    )
    # The data keep every unit's mean difference far from the threshold, so float
    # backends, whatever their summation order, must take the same decisions.
    per_unit = unit * unit * values
    means = sums[~sums.isnan()] / per_unit
    if dtype != torch.uint8:
        assert ((means - threshold).abs() > 0.02).all()
    result = omnivmed_ext.l1_prune(patches, cu, grid, threshold, mode, unit, min_keep)
    assert result.keep.device == patches.device
    assert_same_result(result, expected)
    assert_well_formed(result, patches, cu, grid)
    # something was pruned and something kept after the first frames
    assert 0 < result.index.numel() < patches.shape[0] * patches.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("mode", ["previous", "last_kept"])
@pytest.mark.parametrize("unit", [1, 2])
def test_frames_larger_than_a_strip_match_reference(dtype, mode, unit):
    """Frames whose patch rows do not fit one cache-sized strip are cut into several
    (the last one shorter); every strip of every frame must still match the reference."""
    grid = (70, 4)  # 70 patch rows of 4 patches x 301 values: two strips in fp32
    patches, cu = make_items([5, 1, 4], grid, 301, dtype, "cpu")
    threshold = threshold_for(dtype)
    expected = l1_prune_reference(patches, cu, grid, threshold, mode, unit)
    result = omnivmed_ext.l1_prune(patches, cu, grid, threshold, mode, unit)
    assert_same_result(result, expected)
    assert 0 < result.index.numel() < patches.shape[0] * patches.shape[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("mode", ["previous", "last_kept"])
def test_padded_form_matches(device, dtype, mode):
    grid = (6, 5)
    patches, cu = make_items([3, 5, 2], grid, 7, dtype, device)
    threshold = threshold_for(dtype)
    full = omnivmed_ext.l1_prune(patches, cu, grid, threshold, mode)
    padded = omnivmed_ext.l1_prune_padded(patches, cu, grid, threshold, mode)
    rows = patches.shape[0] * patches.shape[1]
    assert padded.count.dim() == 0 and padded.count.device == patches.device
    k = int(padded.count)
    assert k == full.index.numel()
    assert padded.index.shape == (rows,) and padded.values.shape == (rows, 7)
    assert torch.equal(padded.keep, full.keep)
    assert torch.equal(padded.cu_seqlens, full.cu_seqlens)
    assert torch.equal(padded.index[:k], full.index)
    assert torch.equal(padded.positions[:k], full.positions)
    assert torch.equal(padded.values[:k], full.values)
    assert (padded.index[k:] == -1).all() and (padded.positions[k:] == -1).all()
    assert (padded.values[k:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_threshold_is_exact_at_the_boundary(device):
    # Every value of patch 0 differs by exactly 10, of patch 1 by 9: mean 10 and 9.
    first = torch.full((2, 4), 100, dtype=torch.uint8)
    second = first.clone()
    second[0] += 10
    second[1] += 9
    patches = torch.stack((first, second)).to(device)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    keep = omnivmed_ext.l1_prune(patches, cu, (1, 2), threshold=10.0).keep
    assert keep[1].tolist() == [True, False]  # keep iff distance >= threshold
    keep = omnivmed_ext.l1_prune(patches, cu, (1, 2), threshold=10.25).keep
    assert keep[1].tolist() == [False, False]
    keep = omnivmed_ext.l1_prune(patches, cu, (1, 2), threshold=0.0).keep
    assert keep.all()


@pytest.mark.parametrize("device", DEVICES)
def test_last_kept_catches_slow_drift(device):
    # Each frame drifts by 4 (in 0..255 units) from the one before; threshold 10.
    frames = torch.stack([torch.full((3, 5), 50 + 4 * f, dtype=torch.uint8) for f in range(6)])
    cu = torch.tensor([0, 6], dtype=torch.int32)
    frames, cu = frames.to(device), cu.to(device)
    previous = omnivmed_ext.l1_prune(frames, cu, (1, 3), 10.0, mode="previous").keep
    last_kept = omnivmed_ext.l1_prune(frames, cu, (1, 3), 10.0, mode="last_kept").keep
    assert previous[:, 0].tolist() == [True, False, False, False, False, False]
    # drift since the last kept frame: 4, 8, 12 -> keep, 4, 8
    assert last_kept[:, 0].tolist() == [True, False, False, True, False, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit", [1, 2])
def test_min_keep_per_frame_keeps_largest_then_lowest_index(device, unit):
    grid = (4, 4)
    base = torch.rand(16, 3)
    changed = base.clone()
    changed[13] += 0.05  # below the threshold, but the largest difference
    patches = torch.stack((base, base, changed)).to(device)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=device)
    result = omnivmed_ext.l1_prune(patches, cu, grid, 0.1, unit=unit, min_keep_per_frame=2)
    units_kept = result.keep.sum(1).tolist()
    assert units_kept == [16, 2 * unit * unit, 2 * unit * unit]
    if unit == 1:
        assert result.keep[1].nonzero().squeeze(1).tolist() == [0, 1]  # all tie: lowest index
        assert result.keep[2].nonzero().squeeze(1).tolist() == [0, 13]  # largest, then index 0


@pytest.mark.parametrize("device", DEVICES)
def test_items_of_one_frame_and_exact_repeats(device):
    grid = (3, 3)
    patches = torch.rand(5, 9, 4, device=device)
    patches[4] = patches[3]  # an exact repeat inside the last item
    cu = torch.tensor([0, 1, 2, 3, 5], dtype=torch.int32, device=device)
    result = omnivmed_ext.l1_prune(patches, cu, grid, 0.1)
    assert result.keep[:4].all() and not result.keep[4].any()
    assert result.cu_seqlens.tolist() == [0, 9, 18, 27, 36]
    assert (result.positions[:, 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
def test_values_gradient_is_a_scatter(device, padded):
    patches, cu = make_items([4, 3], (3, 4), 5, torch.float32, device)
    patches.requires_grad_()
    op = omnivmed_ext.l1_prune_padded if padded else omnivmed_ext.l1_prune
    result = op(patches, cu, (3, 4), 0.1)
    weights = torch.randn_like(result.values)
    (result.values * weights).sum().backward()
    expected = torch.zeros(patches.shape[0] * patches.shape[1], 5, device=device)
    k = result.index.numel() if not padded else int(result.count)
    expected[result.index[:k]] = weights[:k]
    torch.testing.assert_close(patches.grad, expected.view_as(patches))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    patches, cu = make_items([3, 2], (2, 4), 6, torch.float32, device)
    byte_patches, byte_cu = make_items([4], (4, 4), 3, torch.uint8, device)
    samples = [
        (patches, cu, 2, 4, 0.1, "previous", 1, 0),
        (patches, cu, 2, 4, 0.1, "last_kept", 2, 1),
        (byte_patches, byte_cu, 4, 4, 10.0, "previous", 2, 0),
    ]
    for op in (torch.ops.omnivmed.l1_prune_padded.default, torch.ops.omnivmed.l1_prune.default):
        for args in samples:
            torch.library.opcheck(op, args)
        # With gradients: opcheck's AOT check sums every output into one accumulator, which
        # cannot mix our bool/int outputs with float values; the other checks apply.
        grad_args = (patches.clone().requires_grad_(), *samples[0][1:])
        torch.library.opcheck(
            op,
            grad_args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    grid = (3, 4)

    def encode_kept(patches, cu):
        kept = omnivmed_ext.l1_prune(patches, cu, grid, 0.1)
        return kept.values.sum(dim=1) * 2.0, kept.positions

    def encode_padded(patches, cu):
        kept = omnivmed_ext.l1_prune_padded(patches, cu, grid, 0.1)
        return kept.values.sum(dim=1) * 2.0, kept.count

    patches, cu = make_items([4, 3], grid, 5, torch.float32, device)
    for fn in (encode_kept, encode_padded):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(patches, cu), fn(patches, cu), strict=True):
            torch.testing.assert_close(got, want)


BAD = [
    ("negative threshold", dict(threshold=-0.1), ValueError, "threshold must be finite and >= 0"),
    ("NaN threshold", dict(threshold=float("nan")), ValueError, "threshold must be finite"),
    ("grid does not match N", dict(grid=(3, 3)), ValueError, "has 9 patches but"),
    ("grid not divisible by unit", dict(grid=(2, 6), unit=4), ValueError, "not divisible by unit"),
    ("unknown mode", dict(mode="mean"), ValueError, "mode must be 'previous' or 'last_kept'"),
    (
        "min_keep too large",
        dict(min_keep_per_frame=13),
        ValueError,
        r"min_keep_per_frame must be in \[0, 12\]",
    ),
    (
        "cu_frames int64",
        dict(cu_frames=torch.tensor([0, 4], dtype=torch.int64)),
        TypeError,
        "int32",
    ),
    (
        "cu_frames decreasing",
        dict(cu_frames=torch.tensor([0, 3, 2, 4], dtype=torch.int32)),
        ValueError,
        "strictly increasing",
    ),
    (
        "cu_frames empty item",
        dict(cu_frames=torch.tensor([0, 2, 2, 4], dtype=torch.int32)),
        ValueError,
        "strictly increasing",
    ),
    (
        "cu_frames short",
        dict(cu_frames=torch.tensor([0, 3], dtype=torch.int32)),
        ValueError,
        "ends at 3 but patches have F = 4",
    ),
    (
        "cu_frames not from 0",
        dict(cu_frames=torch.tensor([1, 4], dtype=torch.int32)),
        ValueError,
        "start at 0",
    ),
    ("patches 2-D", dict(patches=torch.rand(12, 5)), ValueError, r"patches must be \[F, N, P\]"),
    (
        "patches int32",
        dict(patches=torch.zeros(4, 12, 5, dtype=torch.int32)),
        TypeError,
        "float32, float16, bfloat16 or uint8",
    ),
    (
        "uint8 threshold above 255",
        dict(patches=torch.zeros(4, 12, 5, dtype=torch.uint8), threshold=300.0),
        ValueError,
        "0..255",
    ),
]


@pytest.mark.parametrize("name,override,exc,message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("entry", ["python", "dispatcher"])
def test_bad_input_is_rejected_clearly(name, override, exc, message, entry):
    args = dict(
        patches=torch.rand(4, 12, 5),
        cu_frames=torch.tensor([0, 4], dtype=torch.int32),
        grid=(3, 4),
        threshold=0.1,
        mode="previous",
        unit=1,
        min_keep_per_frame=0,
    )
    args.update(override)
    with pytest.raises(exc, match=message):
        if entry == "python":
            omnivmed_ext.l1_prune(**args)
        else:
            grid_h, grid_w = args.pop("grid")
            torch.ops.omnivmed.l1_prune.default(
                args["patches"],
                args["cu_frames"],
                grid_h,
                grid_w,
                args["threshold"],
                args["mode"],
                args["unit"],
                args["min_keep_per_frame"],
            )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["previous", "last_kept"])
def test_cuda_is_deterministic_and_matches_cpu(dtype, mode):
    grid = (14, 18)
    patches, cu = make_items([1, 37, 5, 1, 26], grid, 3 * 14 * 14 // 4, dtype, "cpu")
    threshold = threshold_for(dtype)
    cpu = omnivmed_ext.l1_prune(patches, cu, grid, threshold, mode, 2, 4)
    first = omnivmed_ext.l1_prune(patches.cuda(), cu.cuda(), grid, threshold, mode, 2, 4)
    second = omnivmed_ext.l1_prune(patches.cuda(), cu.cuda(), grid, threshold, mode, 2, 4)
    assert_same_result(first, second)
    assert_same_result(first, cpu)


@pytest.mark.cuda
def test_cuda_graph_capture_of_padded_form():
    grid = (8, 8)
    patches, cu = make_items([6, 4], grid, 12, torch.float32, "cuda")
    static_in = patches.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        omnivmed_ext.l1_prune_padded(static_in, cu, grid, 0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = omnivmed_ext.l1_prune_padded(static_in, cu, grid, 0.1)
    fresh, _ = make_items([6, 4], grid, 12, torch.float32, "cuda")
    static_in.copy_(fresh)
    graph.replay()
    eager = omnivmed_ext.l1_prune_padded(fresh, cu, grid, 0.1)
    for got, want in zip(static_out, eager, strict=True):
        assert torch.equal(got, want)
