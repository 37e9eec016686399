"""In-memory numpy batch iterators.

A `BatchIterator` holds a split as numpy arrays and yields shuffled batches. Fetching
a batch is one fancy-index per array, nothing else per step; `next_stacked(n)` returns
`n` batches stacked on a new leading axis in one call, which is what the jitted
`lax.scan` loops (training curves, truncated unrolls) consume.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class BatchIterator:
    """Infinite iterator of shuffled batches drawn without replacement within an epoch.

    Args:
      arrays: mapping name -> array; all share the leading (example) axis.
      batch_size: examples per batch.
      seed: seed of this iterator's numpy generator.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all arrays need the same number of examples, got {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if not 0 < batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size must be in [1, {self.num_examples}] for this split, got {batch_size}"
            )
        self.arrays = dict(arrays)
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(self.num_examples)
        self._pos = 0

    def _indices(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            if self._pos == self.num_examples:
                self._order = self._rng.permutation(self.num_examples)
                self._pos = 0
            take = min(count - filled, self.num_examples - self._pos)
            out[filled : filled + take] = self._order[self._pos : self._pos + take]
            self._pos += take
            filled += take
        return out

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self._indices(self.batch_size)
        return {k: v[idx] for k, v in self.arrays.items()}

    def next_stacked(self, *lead: int) -> dict[str, np.ndarray]:
        """`prod(lead)` batches, shaped `lead + (batch_size, ...)`, in one fetch."""
        n = int(np.prod(lead)) if lead else 1
        idx = self._indices(n * self.batch_size).reshape(*lead, self.batch_size)
        return {k: v[idx] for k, v in self.arrays.items()}
