"""Batches bounded by a token budget instead of a sample count."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Groups sample indices into batches whose summed lengths stay within `max_tokens`
    (text plus visual tokens, as the caller measures them). Order is shuffled per epoch
    with `seed + epoch` when `shuffle`; call `set_epoch` between epochs. A sample longer
    than the budget is an error that names it, never silently dropped."""

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, shuffle: bool = True, seed: int = 0
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(
                f"samples {too_long[:10]} are longer than max_tokens = {max_tokens} "
                f"(longest: {max(lengths)} tokens)"
            )
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = np.arange(len(self.lengths))
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(order)
        batches, current, used = [], [], 0
        for i in order.tolist():
            if current and used + self.lengths[i] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
