"""`TruncatedGrad`: truncated backpropagation through the unroll.

As learned_optimization's `outer_trainers/truncated_grad.py`: from the worker's
current inner state, unroll T steps with theta and differentiate

    meta_loss(theta) = masked mean over steps and tasks of the per-step losses

through the inner training (the learned optimizer's update included). The next
truncation starts where this one stopped; gradients never flow across truncations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lopt_fast.meta.estimator import EstimatorOut, GradientEstimator, check_trunc_length
from lopt_fast.meta.truncated_step import TruncatedStep


class TruncatedGrad(GradientEstimator):
    """Truncated backprop meta-gradients.

    Args:
      truncated_step: the inner problem.
      trunc_length: inner steps per truncation.

    Example:
        est = TruncatedGrad(step, trunc_length=10)
    """

    name = "tbptt"

    def __init__(self, truncated_step: TruncatedStep, trunc_length: int = 10):
        self.truncated_step = truncated_step
        self.trunc_length = check_trunc_length(trunc_length)

    def init_worker_state(self, theta, key):
        return self.truncated_step.init_step_state(theta, key)

    def compute_gradient_estimate(self, theta, state, key, data) -> EstimatorOut:
        def meta_loss(theta):
            new_state, ys = self.truncated_step.unroll(theta, state, key, self.trunc_length, data)
            mask = ys.mask.astype(jnp.float32)
            loss = jnp.sum(ys.loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
            return loss, (new_state, ys)

        (loss, (new_state, ys)), grad = jax.value_and_grad(meta_loss, has_aux=True)(theta)
        return EstimatorOut(loss=loss, grad=grad, state=new_state,
                            metrics={"resets": jnp.sum(ys.is_done)})
