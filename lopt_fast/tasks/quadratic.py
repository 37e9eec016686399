"""Data-free quadratic tasks: the cheapest problems, for tests and quick meta-training.

`QuadraticTask()` with no `cfg` is learned_optimization's `QuadraticTask`:
`loss(x) = sum(x ** 2)` from `x ~ N(0, I)`. With a `cfg` it is the scaled, shifted
quadratic `sum(scale * (x - center) ** 2)`, and `QuadraticFamily` samples such cfgs.

Batches: these tasks have `datasets = None` and their `loss` ignores its `batch`
argument, so callers pass anything, conventionally `None` (the meta-trainer scans over
`None` when a family has no data; `None` is an empty pytree, so `vmap`/`scan` accept it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lopt_fast.tasks.base import Task, TaskFamily


class QuadraticTask(Task):
    """`loss(x) = sum(scale * (x - center) ** 2)` over a vector `x` of size `dim`.

    Params are a plain `[dim]` array, initialised `N(0, I)` as in learned_optimization.

    Args:
      dim: size of the parameter vector.
      cfg: optional `{"scale": [dim], "center": [dim]}` (arrays; may be traced, e.g.
        inside `vmap` over a `QuadraticFamily`'s samples). None means scale 1, center 0.
    """

    name = "quadratic"
    datasets = None

    def __init__(self, dim: int = 10, cfg: dict[str, Any] | None = None):
        self.dim = int(dim)
        self.cfg = cfg

    def init(self, key: jax.Array) -> jax.Array:
        return jax.random.normal(key, (self.dim,), jnp.float32)

    def loss(self, params: jax.Array, key: jax.Array, batch: Any = None) -> jax.Array:
        del key, batch  # deterministic and data-free
        if self.cfg is None:
            return jnp.sum(jnp.square(params))
        return jnp.sum(self.cfg["scale"] * jnp.square(params - self.cfg["center"]))


class QuadraticFamily(TaskFamily):
    """Quadratics with per-dimension curvatures and a random minimum.

    `sample(key)` draws `cfg = {"scale": [dim], "center": [dim]}` with scales
    log-uniform in `[min_scale, max_scale]` (so conditioning varies across tasks) and
    centers `N(0, I)` (as learned_optimization's `FixedDimQuadraticFamily`);
    `task_fn(cfg)` is `QuadraticTask(dim, cfg)`. Both are pure, so they vmap over keys.

    Args:
      dim: size of the parameter vector.
      min_scale: smallest curvature.
      max_scale: largest curvature.
    """

    datasets = None

    def __init__(self, dim: int = 10, min_scale: float = 0.1, max_scale: float = 10.0):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.dim = int(dim)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.name = f"quadratic_family(dim={self.dim})"

    def sample(self, key: jax.Array) -> dict[str, jax.Array]:
        k_scale, k_center = jax.random.split(key)
        log_scale = jax.random.uniform(k_scale, (self.dim,), jnp.float32,
                                       math.log(self.min_scale), math.log(self.max_scale))
        return {"scale": jnp.exp(log_scale),
                "center": jax.random.normal(k_center, (self.dim,), jnp.float32)}

    def task_fn(self, cfg: dict[str, jax.Array]) -> QuadraticTask:
        return QuadraticTask(self.dim, cfg)
