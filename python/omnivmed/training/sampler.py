"""A sampler whose exact position survives a restart: each epoch is a seeded permutation,
each rank takes every world_size-th index of it, and the state is (epoch, position)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


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

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Remaining full batches of this epoch, advancing the position as they are taken."""
        shard = self.shard(self.epoch)
        while self.position + batch_size <= len(shard):
            batch = shard[self.position : self.position + batch_size]
            self.position += batch_size
            yield batch

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
