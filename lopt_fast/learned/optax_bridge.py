"""Any lopt_fast `Optimizer` as an optax `GradientTransformationExtraArgs`.

    tx = lopt.as_optax(theta, num_steps=1000)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    params = optax.apply_updates(params, updates)

The update is `new_params - params` (computed in float32 and cast back to the
params' dtype), so `optax.apply_updates` lands on the optimizer's new params.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt_fast.optimizers.base import Optimizer


class LOptOptaxState(NamedTuple):
    inner: Any  # the wrapped optimizer's state, params dropped (optax owns them)


def as_optax(opt: Optimizer, num_steps: int) -> optax.GradientTransformationExtraArgs:
    """Wraps `opt` (e.g. `lopt.opt_fn(theta)`) for optax training loops.

    Args:
      opt: an `Optimizer` whose `update` may take `loss=`.
      num_steps: the training length the optimizer is told at init (learned
        optimizers condition on it); required.
    """
    if num_steps is None:
        raise ValueError("as_optax needs num_steps (the length of the training run)")

    def init_fn(params):
        return LOptOptaxState(opt.init(params, num_steps=num_steps).replace(params=None))

    def update_fn(updates, state, params=None, *, loss=None, key=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("this learned optimizer needs params: call tx.update(grads, state, params)")
        # optax owns the params; the inner state holds no copy, which would double memory.
        inner = state.inner.replace(params=params)
        inner = opt.update(inner, updates, loss=loss, key=key)
        new_params = opt.get_params(inner)
        delta = jax.tree.map(
            lambda n, p: (n.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype),
            new_params, params)
        return delta, LOptOptaxState(inner.replace(params=None))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
