"""`Task` and `TaskFamily`: the inner problems a learned optimizer trains.

The interface follows learned_optimization's `tasks.base`:

    task = DigitsMLP()
    params = task.init(key)
    batch = next(task.datasets.train)
    loss = task.loss(params, key, batch)

A `TaskFamily` samples configurations (`sample(key) -> cfg`) and builds a task for
each (`task_fn(cfg) -> Task`); `single_task_to_family` wraps one task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Batch = Any


@dataclasses.dataclass
class Datasets:
    """The four splits of a task, each an iterator of batches (pytrees of numpy arrays)."""

    train: Iterator[Batch]
    inner_valid: Iterator[Batch]
    outer_valid: Iterator[Batch]
    test: Iterator[Batch]

    def split(self, name: str) -> Iterator[Batch]:
        if name not in ("train", "inner_valid", "outer_valid", "test"):
            raise ValueError(
                f"unknown split {name!r}; expected train, inner_valid, outer_valid or test"
            )
        return getattr(self, name)


class Task:
    """An inner problem: parameters, a loss and data.

    Attributes:
      datasets: the task's data splits, or None for data-free tasks (e.g. quadratics).
      name: short identifier used by the CLI and in results.
      supports_synthetic_data: the constructor takes `synthetic=True` (random data of
        the real shapes, for timing where the real data cannot be fetched).
    """

    datasets: Datasets | None = None
    name: str = "Task"
    supports_synthetic_data: bool = False

    def init(self, key: jax.Array) -> Params:
        raise NotImplementedError

    def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def normalizer(self, loss: jax.Array) -> jax.Array:
        """Maps a raw loss into the range used for the meta-loss (clipping divergence).

        learned_optimization's image tasks clip at 1.5 * log(num_classes): a diverged
        inner run then costs a bounded amount instead of dominating the meta-gradient.
        """
        return loss

    def __repr__(self) -> str:
        return self.name


class TaskFamily:
    """A distribution over tasks: `sample(key) -> cfg`, `task_fn(cfg) -> Task`.

    `cfg` must be a pytree of arrays so it can be vmapped over tasks.
    """

    datasets: Datasets | None = None
    name: str = "TaskFamily"

    def sample(self, key: jax.Array) -> Any:
        raise NotImplementedError

    def task_fn(self, cfg: Any) -> Task:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _SingleTaskFamily(TaskFamily):
    def __init__(self, task: Task):
        self.task = task
        self.datasets = task.datasets
        self.name = f"single({task.name})"

    def sample(self, key: jax.Array) -> jax.Array:
        del key
        return jnp.asarray(0, jnp.int32)

    def task_fn(self, cfg: Any) -> Task:
        del cfg
        return self.task


def single_task_to_family(task: Task) -> TaskFamily:
    """A family that always yields `task` (as in learned_optimization)."""
    return _SingleTaskFamily(task)
