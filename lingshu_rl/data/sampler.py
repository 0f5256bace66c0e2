"""Deterministic, resumable prompt order: a fresh seeded permutation every epoch."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class EpochSampler(Generic[T]):
    """Yields items in a seeded order that depends only on ``(seed, epoch)``; its position is its state."""

    def __init__(self, items: Sequence[T], seed: int, shuffle: bool = True, position: int = 0):
        if not items:
            raise ValueError("cannot sample from an empty data set")
        self.items, self.seed, self.shuffle, self.position = items, seed, shuffle, position
        self._epoch, self._order_cache = -1, list(range(len(items)))

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order_cache = list(range(len(self.items)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order_cache)
            self._epoch = epoch
        return self._order_cache

    def next(self, count: int) -> list[T]:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.items))
            out.append(self.items[self._order(epoch)[index]])
            self.position += 1
        return out
