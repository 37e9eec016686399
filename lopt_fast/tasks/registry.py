"""Tasks by name, for the CLI and configs: `get_task("digits_mlp", hidden=(64,))`."""

from __future__ import annotations

from lopt_fast.tasks.base import Task
from lopt_fast.tasks.cifar10 import Conv_Cifar10_16_32x64x64
from lopt_fast.tasks.digits import DigitsConv, DigitsMLP
from lopt_fast.tasks.quadratic import QuadraticTask

# name -> constructor; every task's `.name` is its key here.
_REGISTRY: dict[str, type[Task]] = {
    "digits_mlp": DigitsMLP,
    "digits_conv": DigitsConv,
    "cifar10_conv": Conv_Cifar10_16_32x64x64,
    "quadratic": QuadraticTask,
}

TASKS: tuple[str, ...] = tuple(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The constructor registered as `name` (its class attributes describe the task)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}") from None


def get_task(name: str, **kwargs) -> Task:
    """Builds the task registered as `name`, passing `kwargs` to its constructor.

    Raises:
      ValueError: `name` is not one of `TASKS`.
    """
    return task_class(name)(**kwargs)
