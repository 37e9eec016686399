"""`GradientEstimator`: the interface shared by PES, ES and truncated backprop.

An estimator owns a `TruncatedStep` and a truncation length. Its work per outer step
is split in two so the device part is one pure, jittable, shardable function:

    data = est.get_data()                                   # host: one fetch per unroll
    out = est.compute_gradient_estimate(theta, state, key, data)   # traceable

`out.grad` estimates d(meta-loss)/d(theta); `out.state` is the next worker state.
Every leaf of a worker state has a leading task axis (num_tasks, or 2 * num_tasks for
stacked antithetic pairs), which is what `sharding` splits across devices.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from lopt_fast.meta.truncated_step import TruncatedStep, UnrollOut, interleave_pairs, split_pairs


@flax.struct.dataclass
class EstimatorOut:
    """Result of one gradient estimate.

    Attributes:
      loss: mean meta-loss of the unroll(s) (a scalar).
      grad: the meta-gradient estimate, shaped like theta.
      state: the next worker state.
      metrics: dict of scalar diagnostics (never logged inside jit).
    """

    loss: jax.Array
    grad: Any
    state: Any
    metrics: dict


class GradientEstimator:
    """Base class; see module docstring."""

    truncated_step: TruncatedStep
    trunc_length: int
    name: str = "GradientEstimator"

    def init_worker_state(self, theta: Any, key: jax.Array) -> Any:
        raise NotImplementedError

    def get_data(self) -> Any:
        """Host side: the data for the next `compute_gradient_estimate`."""
        return self.truncated_step.get_data(self.trunc_length)

    def data_task_axes(self, data: Any) -> Any:
        return self.truncated_step.data_task_axes(data)

    def compute_gradient_estimate(self, theta: Any, state: Any, key: jax.Array,
                                  data: Any) -> EstimatorOut:
        raise NotImplementedError


def check_trunc_length(trunc_length: int) -> int:
    if int(trunc_length) < 1:
        raise ValueError(f"trunc_length must be >= 1, got {trunc_length}")
    return int(trunc_length)


def masked_mean_over_steps(out: UnrollOut) -> jax.Array:
    """Per-task mean loss over the unrolled steps that trained (`mask`): shape [n].

    A task whose whole truncation was masked (impossible unless the run length is 0)
    gets 0 instead of learned_optimization's NaN.
    """
    mask = out.mask.astype(jnp.float32)
    return jnp.sum(out.loss * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def sample_perturbations(theta: Any, key: jax.Array, std: float, num: int) -> Any:
    """`num` Gaussian perturbations of theta with standard deviation `std`: leaves [num, ...]."""

    def one(k):
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(k, max(len(leaves), 1))
        return jax.tree.unflatten(treedef, [
            std * jax.random.normal(kk, jnp.shape(x), jnp.result_type(x))
            for kk, x in zip(keys, leaves, strict=False)])

    return jax.vmap(one)(jax.random.split(key, num))


def scale_per_task(coef: jax.Array, tree: Any) -> Any:
    """`coef[i] * tree[i]` for every leaf with leading task axis."""
    return jax.tree.map(lambda x: x * coef.reshape((-1,) + (1,) * (x.ndim - 1)), tree)


class AntitheticEstimator(GradientEstimator):
    """Base of the ES-style estimators: antithetic perturbations of theta.

    Args:
      truncated_step: the inner problem (e.g. `VectorizedLOptTruncatedStep`).
      trunc_length: inner steps per truncation (per outer step).
      std: standard deviation of the perturbations of theta (learned_optimization: 0.01).
    """

    def __init__(self, truncated_step: TruncatedStep, trunc_length: int = 10,
                 std: float = 0.01):
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.truncated_step = truncated_step
        self.trunc_length = check_trunc_length(trunc_length)
        self.std = float(std)

    def antithetic_unroll(self, theta, paired_state, key, data):
        """Unroll theta + eps and theta - eps (pairs interleaved on the task axis, one vmap).

        Returns (eps, next paired state, positive outputs, negative outputs), the
        outputs' fields shaped `[T, num_tasks]`.
        """
        k_eps, k_unroll = jax.random.split(key)
        eps = sample_perturbations(theta, k_eps, self.std, self.truncated_step.num_tasks)
        pos = jax.tree.map(lambda t, e: t + e, theta, eps)
        neg = jax.tree.map(lambda t, e: t - e, theta, eps)
        next_state, ys = self.truncated_step.unroll(
            interleave_pairs(pos, neg), paired_state, k_unroll, self.trunc_length, data,
            theta_is_vector=True, antithetic=True)
        p_ys, n_ys = split_pairs(ys, axis=1)
        return eps, next_state, p_ys, n_ys
