"""`TruncatedES`: antithetic evolution strategies on each truncation.

As learned_optimization's `outer_trainers/truncated_es.py`: both halves of every
antithetic pair start from the worker's current inner state, run T steps with
theta +- eps_i, and

    grad = mean_i (L+_i - L-_i) / (2 std^2) * eps_i

The worker continues from the positive half's state. Truncated ES ignores how theta
shaped the state it starts from, so it is biased on long runs (PES is not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lopt_fast.meta.estimator import (
    AntitheticEstimator,
    EstimatorOut,
    masked_mean_over_steps,
    scale_per_task,
)
from lopt_fast.meta.truncated_step import interleave_pairs, split_pairs


class TruncatedES(AntitheticEstimator):
    """Truncated antithetic ES.

    Args:
      truncated_step: the inner problem.
      trunc_length: inner steps per truncation.
      std: perturbation standard deviation.

    Example:
        est = TruncatedES(step, trunc_length=10)
    """

    name = "es"

    def init_worker_state(self, theta, key):
        return self.truncated_step.init_step_state(theta, key)

    def compute_gradient_estimate(self, theta, state, key, data) -> EstimatorOut:
        eps, new_state, p_ys, n_ys = self.antithetic_unroll(
            theta, interleave_pairs(state, state), key, data)
        pos_loss, neg_loss = masked_mean_over_steps(p_ys), masked_mean_over_steps(n_ys)
        delta = pos_loss - neg_loss
        grad = jax.tree.map(lambda g: jnp.mean(g, axis=0),
                            scale_per_task(delta / (2.0 * self.std**2), eps))
        next_state, _ = split_pairs(new_state)
        return EstimatorOut(loss=jnp.mean((pos_loss + neg_loss) / 2.0), grad=grad,
                            state=next_state,
                            metrics={"delta_loss_abs_mean": jnp.mean(jnp.abs(delta)),
                                     "resets": jnp.sum(p_ys.is_done)})
