"""Hand-designed baselines (SGD, momentum, Adam, AdamW) behind the `Optimizer` interface.

Each one wraps an optax `GradientTransformation`, so their math *is* optax's; the
wrapper only carries the parameters inside the state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lopt_fast.optimizers.base import Optimizer, check_same_structure


@flax.struct.dataclass
class OptaxState:
    params: Any
    state: Any
    optax_state: Any
    iteration: jax.Array


class OptaxOptimizer(Optimizer):
    """Adapts any `optax.GradientTransformation` to the `Optimizer` interface."""

    def __init__(self, tx: optax.GradientTransformation, name: str = "OptaxOptimizer"):
        self.tx = tx
        self.name = name

    def init(self, params, model_state=None, num_steps=None, key=None) -> OptaxState:
        del num_steps, key  # hand-designed optimizers need neither.
        return OptaxState(
            params=params,
            state=model_state,
            optax_state=self.tx.init(params),
            iteration=jnp.asarray(0, jnp.int32),
        )

    def update(self, opt_state, grad, loss=None, model_state=None, key=None, **kwargs):
        del loss, key, kwargs
        check_same_structure(opt_state.params, grad)
        updates, optax_state = self.tx.update(grad, opt_state.optax_state, opt_state.params)
        params = optax.apply_updates(opt_state.params, updates)
        return OptaxState(
            params=params,
            state=model_state,
            optax_state=optax_state,
            iteration=opt_state.iteration + 1,
        )


class SGD(OptaxOptimizer):
    def __init__(self, learning_rate: float = 0.01):
        super().__init__(optax.sgd(learning_rate), name=f"SGD(lr={learning_rate:g})")


class SGDM(OptaxOptimizer):
    """SGD with (heavy-ball) momentum."""

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.9):
        super().__init__(
            optax.sgd(learning_rate, momentum=momentum),
            name=f"SGDM(lr={learning_rate:g}, momentum={momentum:g})",
        )


class Adam(OptaxOptimizer):
    def __init__(self, learning_rate: float = 1e-3, b1=0.9, b2=0.999, eps=1e-8):
        super().__init__(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
                         name=f"Adam(lr={learning_rate:g})")


class AdamW(OptaxOptimizer):
    def __init__(self, learning_rate: float = 1e-3, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay: float = 1e-4):
        super().__init__(
            optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
            name=f"AdamW(lr={learning_rate:g}, wd={weight_decay:g})",
        )
