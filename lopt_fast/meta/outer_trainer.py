"""`OuterTrainer`: meta-train theta from one or more gradient estimators.

The counterpart of learned_optimization's `SingleMachineGradientLearner`: each outer
step asks every estimator for a meta-gradient, averages them, replaces non-finite
entries with 0 and applies an optax outer optimizer (default: clip each entry to
[-3, 3], then Adam(3e-3), as learned_optimization's
`GradientClipOptimizer(Adam(3e-3))`). One outer step is one jitted function; with a
`mesh` its task axis is sharded over devices (see `sharding`). Metrics are returned,
never logged inside jit.

Example:
    lopt = AdafacMLPLOpt(hidden_size=32)
    step = VectorizedLOptTruncatedStep(task, lopt, ConstantTruncationSchedule(200), 8,
                                       random_initial_iteration_offset=200)
    trainer = OuterTrainer([TruncatedPES(step, trunc_length=10)])
    state = trainer.init(jax.random.key(0))
    for _ in range(1000):
        state, metrics = trainer.update(state)
    theta = state.theta
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lopt_fast.meta import sharding as shd
from lopt_fast.meta.estimator import GradientEstimator


@flax.struct.dataclass
class MetaTrainState:
    """Everything meta-training needs to continue: what a checkpoint holds."""

    step: jax.Array  # int32: outer steps taken
    theta: Any
    opt_state: Any
    worker_states: tuple
    key: jax.Array


def default_outer_optimizer(learning_rate: float = 3e-3,
                            grad_clip: float = 3.0) -> optax.GradientTransformation:
    """Elementwise gradient clipping then Adam (learned_optimization's default)."""
    return optax.chain(optax.clip(grad_clip), optax.adam(learning_rate))


class OuterTrainer:
    """Average estimators' meta-gradients and apply an optax optimizer to theta.

    Args:
      estimators: gradient estimators (their truncated steps share one theta layout).
      outer_opt: optax transformation for theta (default `default_outer_optimizer()`).
      mesh: shard the task axes over this mesh (`sharding.task_mesh()`); None: no
        explicit sharding (single device).
    """

    def __init__(self, estimators: Sequence[GradientEstimator],
                 outer_opt: optax.GradientTransformation | None = None, *, mesh=None):
        if not estimators:
            raise ValueError("OuterTrainer needs at least one gradient estimator")
        self.estimators = tuple(estimators)
        self.outer_opt = default_outer_optimizer() if outer_opt is None else outer_opt
        self.mesh = mesh
        self._jit_update = None
        self._state_shardings = None

    # -- init ---------------------------------------------------------------------------

    def _init(self, key, theta):
        k_theta, k_workers, k_next = jax.random.split(key, 3)
        if theta is None:
            theta = self.estimators[0].truncated_step.outer_init(k_theta)
        keys = jax.random.split(k_workers, len(self.estimators))
        workers = tuple(est.init_worker_state(theta, k) for est, k in zip(self.estimators, keys,
                                                                          strict=True))
        return MetaTrainState(step=jnp.asarray(0, jnp.int32), theta=theta,
                              opt_state=self.outer_opt.init(theta), worker_states=workers,
                              key=k_next)

    def init(self, key: jax.Array, theta: Any = None) -> MetaTrainState:
        """Initial state: theta (random unless given), outer optimizer and worker states."""
        state = jax.jit(self._init)(key, theta)
        return self.shard_state(state)

    def state_task_axes(self, state: MetaTrainState) -> MetaTrainState:
        """Task axis of every leaf: 0 for worker states, None (replicated) otherwise."""
        none = lambda t: jax.tree.map(lambda _: None, t)
        return MetaTrainState(step=None, theta=none(state.theta),
                              opt_state=none(state.opt_state),
                              worker_states=jax.tree.map(lambda _: 0, state.worker_states),
                              key=None)

    def shard_state(self, state: MetaTrainState) -> MetaTrainState:
        """Place `state` on the mesh (no-op without a mesh)."""
        if self.mesh is None:
            return state
        axes = self.state_task_axes(state)
        shd.check_divisible(self.mesh, state.worker_states, axes.worker_states, "worker_states")
        self._state_shardings = shd.tree_shardings(self.mesh, state, axes)
        return shd.put(state, self._state_shardings)

    # -- update -------------------------------------------------------------------------

    def _update(self, state: MetaTrainState, datas):
        key, *keys = jax.random.split(state.key, len(self.estimators) + 1)
        outs = [est.compute_gradient_estimate(state.theta, ws, k, d)
                for est, ws, k, d in zip(self.estimators, state.worker_states, keys, datas,
                                         strict=True)]
        grad = jax.tree.map(lambda *gs: sum(gs) / len(gs), *[o.grad for o in outs])
        grad = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), grad)
        updates, opt_state = self.outer_opt.update(grad, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        loss = jnp.mean(jnp.stack([o.loss for o in outs]))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grad)}
        for i, (est, out) in enumerate(zip(self.estimators, outs, strict=True)):
            prefix = f"{est.name}{i}" if len(self.estimators) > 1 else est.name
            metrics[f"{prefix}/loss"] = out.loss
            metrics.update({f"{prefix}/{k}": v for k, v in out.metrics.items()})
        new_state = MetaTrainState(step=state.step + 1, theta=theta, opt_state=opt_state,
                                   worker_states=tuple(o.state for o in outs), key=key)
        return new_state, metrics

    def _compile(self, state, datas):
        if self.mesh is None:
            return jax.jit(self._update)
        if self._state_shardings is None:
            self.shard_state(state)
        data_shardings = tuple(
            shd.tree_shardings(self.mesh, d, est.data_task_axes(d))
            for est, d in zip(self.estimators, datas, strict=True))
        return jax.jit(self._update,
                       in_shardings=(self._state_shardings, data_shardings),
                       out_shardings=(self._state_shardings, shd.replicated(self.mesh)))

    def update(self, state: MetaTrainState) -> tuple[MetaTrainState, dict]:
        """One outer step: fetch each estimator's data on the host, then one jitted call."""
        datas = tuple(est.get_data() for est in self.estimators)
        if self._jit_update is None:
            self._jit_update = self._compile(state, datas)
        if self.mesh is None:
            return self._jit_update(state, datas)
        with jax.set_mesh(self.mesh):  # the tasks' steps run per device (`shd.local_tasks`)
            return self._jit_update(state, datas)

    def inner_steps_per_update(self) -> int:
        """Inner steps x tasks run per outer step (antithetic halves counted)."""
        total = 0
        for est in self.estimators:
            pairs = 2 if est.name in ("pes", "es") else 1
            total += pairs * est.trunc_length * est.truncated_step.num_tasks
        return total
