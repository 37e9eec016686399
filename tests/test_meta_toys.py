"""Toy meta-problems shared by the meta tests (and sanity tests of the toys themselves).

* `LearnedLR`: a learned optimizer whose theta is `{"log_lr": scalar}` (plain SGD).
* `Quadratic`: a deterministic data-free quadratic, so meta-gradients are exact.
* `Regression`: linear regression on an in-memory `BatchIterator`, exercising the
  data path (device pools, batches per task).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.learned.base import LearnedOptimizer
from lopt_fast.optimizers.base import Optimizer
from lopt_fast.tasks.base import Datasets, Task
from lopt_fast.tasks.data import BatchIterator


@flax.struct.dataclass
class SGDState:
    params: Any
    state: Any
    iteration: jax.Array


class _SGD(Optimizer):
    def __init__(self, lr):
        self.lr = lr

    def init(self, params, model_state=None, num_steps=None, key=None):
        return SGDState(params=params, state=model_state, iteration=jnp.asarray(0, jnp.int32))

    def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kw):
        params = jax.tree.map(lambda p, g: p - self.lr * g, opt_state.params, grad)
        return SGDState(params=params, state=model_state, iteration=opt_state.iteration + 1)


class LearnedLR(LearnedOptimizer):
    """SGD with learning rate exp(theta["log_lr"])."""

    name = "LearnedLR"

    def __init__(self, init_log_lr: float = float(np.log(0.1))):
        self.init_log_lr = init_log_lr

    def init(self, key):
        del key
        return {"log_lr": jnp.asarray(self.init_log_lr, jnp.float32)}

    def opt_fn(self, theta, is_training=False, backend="auto"):
        return _SGD(jnp.exp(theta["log_lr"]))


class Quadratic(Task):
    """0.5 * sum(a * x^2) from a fixed start (deterministic: exact meta-gradients)."""

    name = "toy-quadratic"

    def __init__(self, dim: int = 4):
        self.a = jnp.linspace(0.5, 2.0, dim)
        self.x0 = jnp.linspace(1.0, -1.0, dim)

    def init(self, key):
        del key
        return {"x": self.x0}

    def loss(self, params, key, batch):
        del key, batch
        return 0.5 * jnp.sum(self.a * params["x"] ** 2)


def quadratic_losses(task: Quadratic, log_lr, num_steps: int) -> jax.Array:
    """The losses before each of `num_steps` SGD steps (the per-step meta-losses)."""
    x, lr, out = task.x0, jnp.exp(log_lr), []
    for _ in range(num_steps):
        out.append(0.5 * jnp.sum(task.a * x**2))
        x = x - lr * task.a * x
    return jnp.stack(out)


class Regression(Task):
    """Linear regression on 256 fixed examples, batches of 16."""

    name = "toy-regression"

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(256, 5)).astype(np.float32)
        y = (x @ rng.normal(size=(5,)) + 0.1 * rng.normal(size=256)).astype(np.float32)
        arrays = {"x": x, "y": y}
        self.datasets = Datasets(*(BatchIterator(arrays, 16, seed=s) for s in range(4)))

    def init(self, key):
        return {"w": 0.1 * jax.random.normal(key, (5,)), "b": jnp.zeros(())}

    def loss(self, params, key, batch):
        del key
        pred = batch["x"] @ params["w"] + params["b"]
        return jnp.mean((pred - batch["y"]) ** 2)


def test_quadratic_losses_match_task():
    task = Quadratic()
    losses = quadratic_losses(task, jnp.log(0.1), 3)
    assert losses.shape == (3,)
    assert float(losses[0]) == float(task.loss(task.init(None), None, None))
    assert bool(jnp.all(jnp.diff(losses) < 0))
