"""Inner problems for learned optimizers: tasks, task families, data and a registry.

    from lopt_fast import tasks
    task = tasks.get_task("digits_mlp")        # or tasks.DigitsMLP()
    params = task.init(jax.random.key(0))
    loss = task.loss(params, key, next(task.datasets.train))
"""

from lopt_fast.tasks.base import Datasets, Task, TaskFamily, single_task_to_family
from lopt_fast.tasks.cifar10 import Conv_Cifar10_16_32x64x64, DatasetNotFoundError
from lopt_fast.tasks.data import BatchIterator
from lopt_fast.tasks.digits import DigitsConv, DigitsMLP
from lopt_fast.tasks.quadratic import QuadraticFamily, QuadraticTask
from lopt_fast.tasks.registry import TASKS, get_task

__all__ = [
    "TASKS",
    "BatchIterator",
    "Conv_Cifar10_16_32x64x64",
    "DatasetNotFoundError",
    "Datasets",
    "DigitsConv",
    "DigitsMLP",
    "QuadraticFamily",
    "QuadraticTask",
    "Task",
    "TaskFamily",
    "get_task",
    "single_task_to_family",
]
