"""`TruncatedStep`: the inner problem that gradient estimators unroll.

It mirrors learned_optimization's `outer_trainers/truncated_step.py`, restructured so
that a whole truncation is one traceable call:

    state = step.init_step_state(theta, key)                     # [num_tasks] inner states
    data = step.get_data(trunc_length)                           # host side, once per unroll
    state, out = step.unroll(theta, state, key, trunc_length, data)   # one lax.scan

`unroll` is pure (no Python per inner step), so an estimator can jit it together
with the gradient math, differentiate through it, and shard its task axis.

Antithetic pairs: with `antithetic=True` the state, and theta when
`theta_is_vector`, hold `2 * num_tasks` entries, interleaved as
`[pos_0, neg_0, pos_1, neg_1, ...]`; both halves of a pair get the same data and
the same random keys, so one vmap runs both and a pair never straddles devices
when `num_tasks` is a multiple of the device count.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

MetaParams = Any
UnrollState = Any


@flax.struct.dataclass
class UnrollOut:
    """Per inner step, per task outputs of an unroll; every field is `[T, n]`.

    Attributes:
      loss: the (normalised) meta-loss of the step; 0 on reset steps.
      mask: False on reset steps (no training happened, the loss is meaningless).
      is_done: True on the step that ends an inner run (it is reset on the next step).
      iteration: the inner step count after this step (0 after a reset).
    """

    loss: jax.Array
    mask: jax.Array
    is_done: jax.Array
    iteration: jax.Array


class TruncatedStep:
    """Interface of an inner problem driven by meta-parameters `theta`."""

    num_tasks: int

    def outer_init(self, key: jax.Array) -> MetaParams:
        """Initial meta-parameters."""
        raise NotImplementedError

    def init_step_state(self, theta: MetaParams, key: jax.Array, *,
                        theta_is_vector: bool = False) -> UnrollState:
        """`num_tasks` fresh inner states (leading axis: task)."""
        raise NotImplementedError

    def get_data(self, trunc_length: int) -> Any:
        """Host side: the data argument of the next `unroll` (one fetch per unroll)."""
        raise NotImplementedError

    def data_task_axes(self, data: Any) -> Any:
        """For each leaf of `data`, the axis that indexes tasks, or None (replicated)."""
        raise NotImplementedError

    def unroll(self, theta: MetaParams, state: UnrollState, key: jax.Array,
               trunc_length: int, data: Any, *, theta_is_vector: bool = False,
               antithetic: bool = False) -> tuple[UnrollState, UnrollOut]:
        """Run `trunc_length` inner steps of every task; traceable, one `lax.scan`."""
        raise NotImplementedError


def interleave_pairs(pos: Any, neg: Any) -> Any:
    """Stack two trees with leading axis n into one with axis 2n: [p0, n0, p1, n1, ...]."""
    return jax.tree.map(
        lambda p, n: jnp.stack([p, n], axis=1).reshape((2 * p.shape[0],) + p.shape[1:]),
        pos, neg)


def split_pairs(tree: Any, axis: int = 0) -> tuple[Any, Any]:
    """Inverse of `interleave_pairs` along `axis`: returns (pos, neg)."""

    def take(x, k):
        shape = x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1:]
        return jnp.take(x.reshape(shape), k, axis=axis + 1)

    return jax.tree.map(lambda x: take(x, 0), tree), jax.tree.map(lambda x: take(x, 1), tree)


def repeat_pairs(tree: Any, axis: int = 0) -> Any:
    """Duplicate every entry along `axis` (x0, x0, x1, x1, ...): shared data and keys."""
    return jax.tree.map(lambda x: jnp.repeat(x, 2, axis=axis), tree)
