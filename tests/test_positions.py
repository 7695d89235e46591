import pytest
import torch

from omnivmed_ext import (
    ItemGrid,
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    frame_positions,
    grid_positions,
    lengths_from_cu_seqlens,
    packed_positions,
)


def test_grid_positions_row_major():
    pos = grid_positions(2, 3)
    assert pos.dtype == torch.int32 and pos.shape == (6, 3)
    assert pos.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_frame_positions_keep_true_indices_after_subsampling():
    pos = frame_positions(3, 1, 2, t_offset=10, t_stride=4, dtype=torch.int64)
    assert pos[:, 0].tolist() == [10, 10, 14, 14, 18, 18]
    assert pos[:, 2].tolist() == [0, 1] * 3


def test_packed_positions_and_cu_seqlens():
    packed = packed_positions([(1, 2, 2), ItemGrid(3, 1, 2), (2, 1, 1)])
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 4, 10, 12]
    assert packed.max_seqlen == 6
    assert packed.positions.shape == (12, 3)
    # t restarts in every item
    assert packed.positions[4:10, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert packed.positions[10:, 0].tolist() == [0, 1]
    assert lengths_from_cu_seqlens(packed.cu_seqlens).tolist() == [4, 6, 2]
    check_cu_seqlens(packed.cu_seqlens, 12)


@pytest.mark.parametrize(
    "cu,total,message",
    [
        (torch.tensor([0, 3, 2], dtype=torch.int32), 2, "non-decreasing"),
        (torch.tensor([1, 3], dtype=torch.int32), 3, "start at 0"),
        (torch.tensor([0, 3], dtype=torch.int32), 4, "ends at 3 but there are 4 tokens"),
        (torch.tensor([0, 3], dtype=torch.int64), 3, "int32"),
        (torch.tensor([0], dtype=torch.int32), 0, "B\\+1 >= 2"),
    ],
)
def test_check_cu_seqlens_rejects(cu, total, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_cu_seqlens(cu, total)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_grid_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        grid_positions(bad, 2)


def test_negative_lengths_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        cu_seqlens_from_lengths([3, -1])


def test_empty_pack_rejected():
    with pytest.raises(ValueError, match="at least one item"):
        packed_positions([])
