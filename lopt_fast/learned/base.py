"""`LearnedOptimizer`: meta-parameters (theta) -> an `Optimizer`."""

from __future__ import annotations

from typing import Any

import jax

from lopt_fast.optimizers.base import Optimizer

MetaParams = Any


class LearnedOptimizer:
    """Base class: `init(key) -> theta` and `opt_fn(theta) -> Optimizer`."""

    name: str = "LearnedOptimizer"

    def init(self, key: jax.Array) -> MetaParams:
        raise NotImplementedError

    def opt_fn(self, theta: MetaParams, is_training: bool = False, **kwargs) -> Optimizer:
        raise NotImplementedError

    def as_optax(self, theta: MetaParams, num_steps: int, **kwargs):
        """This optimizer as an `optax.GradientTransformationExtraArgs` (see `optax_bridge`)."""
        from lopt_fast.learned.optax_bridge import as_optax

        return as_optax(self.opt_fn(theta, **kwargs), num_steps=num_steps)

    def __repr__(self) -> str:
        return self.name
