"""`TruncatedPES`: Persistent Evolution Strategies (Vicol et al., 2021).

Same estimator as learned_optimization's `outer_trainers/truncated_pes.py`. Each of
the `num_tasks` workers keeps a positive and a negative inner state (an antithetic
pair, both run in one vmap, see `truncated_step`) and an accumulator of the
perturbations it has used since its inner run started. Per truncation:

    eps_i ~ N(0, std^2 I)                       fresh perturbation of theta
    run pos_i with theta + eps_i, neg_i with theta - eps_i for T steps
    L+_i, L-_i = masked mean of the per-step meta-losses
    c_i = (L+_i - L-_i) / (2 std^2)
    A_i = acc_i + eps_i                         accumulated perturbation
    f_i = fraction of the T steps at or after the step that ended the run (is_done)
    g_i = c_i * (f_i * eps_i + (1 - f_i) * A_i) (steps before a reset see A_i, after it
                                                  only eps_i)
    grad = mean_i g_i
    acc_i <- eps_i if the run ended in this truncation else A_i

and the reported loss is mean_i (L+_i + L-_i) / 2. With `acc = 0` this is the
truncated-ES estimate. In truncations where no run ends it is the unbiased PES
estimate of the gradient of the Gaussian-smoothed truncation loss, through the whole
run so far (tests/test_meta_pes.py checks this against exact meta-gradients).

Run boundaries follow learned_optimization exactly: the step that *ends* a run
(`is_done`) already counts as finished, so in a truncation containing the end of a
run the history term is scaled by (1 - f_i) and the end step weighs only eps_i.
That trades a small bias at run ends for less variance; it is kept so that results
match learned_optimization's.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from lopt_fast.meta.estimator import (
    AntitheticEstimator,
    EstimatorOut,
    masked_mean_over_steps,
    scale_per_task,
)
from lopt_fast.meta.truncated_step import UnrollOut, interleave_pairs


@flax.struct.dataclass
class PESWorkerState:
    """`unroll_state`: 2 * num_tasks inner states, pairs interleaved [pos_0, neg_0, ...];
    `accumulator`: per task, the sum of perturbations since its run started."""

    unroll_state: Any
    accumulator: Any


def compute_pes_grad(p_ys: UnrollOut, n_ys: UnrollOut, accumulator: Any, eps: Any,
                     std: float) -> tuple[jax.Array, Any, Any, jax.Array]:
    """The PES update from one truncation's outputs.

    Args:
      p_ys, n_ys: outputs of the positive / negative unrolls, fields `[T, num_tasks]`.
      accumulator: per-task accumulated perturbations (leaves `[num_tasks, ...]`).
      eps: this truncation's positive perturbations (leaves `[num_tasks, ...]`).
      std: perturbation standard deviation.

    Returns:
      (mean loss, gradient estimate, new accumulator, per-task L+ - L-).
    """
    pos_loss = masked_mean_over_steps(p_ys)
    neg_loss = masked_mean_over_steps(n_ys)
    delta = pos_loss - neg_loss
    contrib = delta / (2.0 * std**2)

    finished = jnp.cumsum(p_ys.is_done.astype(jnp.int32), axis=0) > 0  # [T, n]
    frac_finished = jnp.mean(finished.astype(jnp.float32), axis=0)  # [n]
    accumulated = jax.tree.map(jnp.add, accumulator, eps)
    # Mean over steps of c * (eps if finished[t] else acc + eps).
    mixed = jax.tree.map(
        lambda e, a: e + scale_per_task(1.0 - frac_finished, a - e), eps, accumulated)
    grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), scale_per_task(contrib, mixed))
    ended = finished[-1]
    new_accumulator = jax.tree.map(
        lambda e, a: jnp.where(ended.reshape((-1,) + (1,) * (e.ndim - 1)), e, a),
        eps, accumulated)
    return jnp.mean((pos_loss + neg_loss) / 2.0), grad, new_accumulator, delta


class TruncatedPES(AntitheticEstimator):
    """PES gradient estimates from antithetic truncated unrolls.

    Args:
      truncated_step: the inner problem (e.g. `VectorizedLOptTruncatedStep`).
      trunc_length: inner steps per truncation (per outer step).
      std: standard deviation of the perturbations of theta (learned_optimization: 0.01).

    Example:
        est = TruncatedPES(step, trunc_length=10)
        state = est.init_worker_state(theta, key)
        out = est.compute_gradient_estimate(theta, state, key2, est.get_data())
    """

    name = "pes"

    def init_worker_state(self, theta, key) -> PESWorkerState:
        # As in learned_optimization, the first inner states use the unperturbed theta.
        state = self.truncated_step.init_step_state(theta, key)
        n = self.truncated_step.num_tasks
        acc = jax.tree.map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)), theta)
        return PESWorkerState(unroll_state=interleave_pairs(state, state), accumulator=acc)

    def compute_gradient_estimate(self, theta, state: PESWorkerState, key, data) -> EstimatorOut:
        eps, unroll_state, p_ys, n_ys = self.antithetic_unroll(
            theta, state.unroll_state, key, data)
        loss, grad, acc, delta = compute_pes_grad(p_ys, n_ys, state.accumulator, eps, self.std)
        metrics = {"delta_loss_abs_mean": jnp.mean(jnp.abs(delta)),
                   "resets": jnp.sum(p_ys.is_done),
                   "inner_step_mean": jnp.mean(p_ys.iteration[-1].astype(jnp.float32))}
        return EstimatorOut(loss=loss, grad=grad,
                            state=PESWorkerState(unroll_state=unroll_state, accumulator=acc),
                            metrics=metrics)
