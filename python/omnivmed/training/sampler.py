"""A sampler whose exact position survives a restart: each epoch is a seeded permutation,
each rank takes every world_size-th index of it, and the state is (epoch, position).

The position counts the samples the training loop has consumed, not those a `DataLoader`
has fetched ahead: `ResumableBatchSampler` hands the loader the remaining batches without
moving it, and the loop calls `advance` as it takes each batch, so a checkpoint never
counts a prefetched batch that was not trained on."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShardedSampler:
    def __init__(self, size: int, rank: int, world_size: int, seed: int = 0) -> None:
        if size < world_size:
            raise ValueError(f"{size} samples cannot feed {world_size} ranks")
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0
        self.position = 0  # samples of this rank's shard already consumed in this epoch

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size  # equal shards keep ranks in lockstep

    def shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=g)[: self.per_rank * self.world_size]
        return order[self.rank :: self.world_size].tolist()

    def remaining(self, batch_size: int) -> list[list[int]]:
        """This epoch's full batches from the current position on (the position stays)."""
        shard = self.shard(self.epoch)
        starts = range(self.position, len(shard) - batch_size + 1, batch_size)
        return [shard[p : p + batch_size] for p in starts]

    def advance(self, count: int) -> None:
        """`count` more samples of this epoch were consumed."""
        self.position += count

    def next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size,
                "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint was taken with {key} = {state[key]}, this run has "
                    f"{getattr(self, key)}"
                )
        self.epoch, self.position = state["epoch"], state["position"]


class ResumableBatchSampler(Sampler[list[int]]):
    """The batch sampler a `DataLoader` draws from: each iteration is the rest of the
    current epoch from `sampler`'s position, which the consumer advances."""

    def __init__(self, sampler: ResumableShardedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.remaining(self.batch_size))

    def __len__(self) -> int:
        return len(self.sampler.remaining(self.batch_size))
