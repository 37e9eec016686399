"""`VectorizedLOptTruncatedStep`: num_tasks inner problems trained by a learned optimizer.

The learned-optimizer inner problem of learned_optimization's
`outer_trainers/lopt_truncated_step.py`, vectorized with `vmap` (each task may have
its own theta) and unrolled with one `lax.scan` per truncation.

Per inner step and task (all branches computed, selected with `where`):

* if the task's run ended on the previous step (`is_done`), reset it: sample a new
  task config, init its params and the optimizer state (`num_steps` = the run's
  length from the truncation schedule); this step's output is masked out;
* otherwise take one step: `loss, g = value_and_grad(task.loss)(params, batch)`,
  `opt_state = opt.update(opt_state, g, loss=loss)` with `opt = lopt.opt_fn(theta_i)`.
  The step's meta-loss is the training loss before the update (as in
  learned_optimization), or, with `meta_loss_split`, the loss of the updated params
  on a batch of that split (e.g. held-out "outer_valid" data);
* the meta-loss goes through `task.normalizer`.

Data: when a split's iterator is an in-memory `BatchIterator` (it has `arrays` and
`batch_size`) the whole split is put on the device once and every unroll gathers
its `[T, num_tasks, batch]` examples with one indexed take inside the jitted step,
with indices drawn from the unroll's key; resumed runs therefore see the same
batches, and no data crosses from the host per step. Other iterators are read on
the host with one `next_stacked(T, num_tasks)` call per unroll.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.learned.base import LearnedOptimizer
from lopt_fast.meta.sharding import local_tasks
from lopt_fast.meta.truncated_step import TruncatedStep, UnrollOut, repeat_pairs
from lopt_fast.meta.truncation import TruncationSchedule, TruncationState
from lopt_fast.tasks.base import Task, TaskFamily, single_task_to_family

_SPLITS = ("train", "inner_valid", "outer_valid", "test")


@flax.struct.dataclass
class LOptUnrollState:
    """State of one inner problem (vmapped: every leaf gets a leading task axis)."""

    opt_state: Any
    inner_step: jax.Array  # int32: inner steps taken in the current run
    trunc_state: TruncationState
    task_param: Any  # the TaskFamily config of the current run
    is_done: jax.Array  # bool: the run ended, reset on the next step


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


class VectorizedLOptTruncatedStep(TruncatedStep):
    """Train `num_tasks` inner problems with a learned optimizer, in lockstep.

    Args:
      task_family: a `TaskFamily`, or a `Task` (wrapped with `single_task_to_family`).
      learned_opt: the learned optimizer; `opt_fn(theta)` is called inside vmap.
      trunc_sched: length of each inner run (e.g. `ConstantTruncationSchedule(200)`).
      num_tasks: inner problems run in parallel.
      random_initial_iteration_offset: initial `inner_step` of each task is drawn
        from [0, offset) so tasks are out of step (set it to the run length).
      meta_loss_split: None (training loss of each step) or a split name whose
        batches score the updated params (e.g. "outer_valid").
      backend: passed to `learned_opt.opt_fn` (None: don't pass it).
      mlp_precision: passed to `learned_opt.opt_fn` unless None (the default): the kernel
        backends' MLP dot operands (`lopt_fast.backends`).
      kernel_options: passed to `learned_opt.opt_fn` unless None (the default): more
        keyword arguments of the kernel backend's update (`lopt_fast.backends`).

    Example:
        step = VectorizedLOptTruncatedStep(task, AdafacMLPLOpt(hidden_size=32),
                                           ConstantTruncationSchedule(200), num_tasks=8,
                                           random_initial_iteration_offset=200)
    """

    def __init__(self, task_family: TaskFamily | Task, learned_opt: LearnedOptimizer,
                 trunc_sched: TruncationSchedule, num_tasks: int, *,
                 random_initial_iteration_offset: int = 0,
                 meta_loss_split: str | None = None, backend: str | None = "auto",
                 mlp_precision: str | None = None, kernel_options: dict | None = None):
        if isinstance(task_family, Task):
            task_family = single_task_to_family(task_family)
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if meta_loss_split is not None and meta_loss_split not in _SPLITS:
            raise ValueError(f"meta_loss_split must be None or one of {_SPLITS}, "
                             f"got {meta_loss_split!r}")
        self.task_family = task_family
        self.learned_opt = learned_opt
        self.trunc_sched = trunc_sched
        self.num_tasks = int(num_tasks)
        self.random_initial_iteration_offset = int(random_initial_iteration_offset)
        self.meta_loss_split = meta_loss_split
        self._opt_kwargs = {k: v for k, v in (("backend", backend),
                                              ("mlp_precision", mlp_precision),
                                              ("kernel_options", kernel_options))
                            if v is not None}
        self._pools: dict[str, Any] = {}
        datasets = task_family.datasets
        if datasets is None and meta_loss_split is not None:
            raise ValueError(f"meta_loss_split={meta_loss_split!r} needs a task with data; "
                             f"{task_family.name} has none")
        self._splits = () if datasets is None else (
            ("train",) + (() if meta_loss_split is None else (meta_loss_split,)))
        for split in self._splits:
            it = datasets.split(split)
            if hasattr(it, "arrays") and hasattr(it, "batch_size"):
                self._pools[split] = None  # filled lazily by get_data

    def __repr__(self) -> str:
        return (f"VectorizedLOptTruncatedStep({self.task_family.name}, {self.learned_opt.name}, "
                f"{self.trunc_sched}, num_tasks={self.num_tasks})")

    # -- init ---------------------------------------------------------------------------

    def outer_init(self, key):
        return self.learned_opt.init(key)

    def _fresh_run(self, theta, key, length):
        k_cfg, k_params = jax.random.split(key)
        cfg = self.task_family.sample(k_cfg)
        params = self.task_family.task_fn(cfg).init(k_params)
        opt = self.learned_opt.opt_fn(theta, **self._opt_kwargs)
        return opt.init(params, num_steps=length), cfg

    def _init_single(self, theta, key):
        k_run, k_trunc = jax.random.split(key)
        trunc_state = self.trunc_sched.init(k_trunc)
        opt_state, cfg = self._fresh_run(theta, k_run, trunc_state.length)
        return LOptUnrollState(opt_state=opt_state, inner_step=jnp.asarray(0, jnp.int32),
                               trunc_state=trunc_state, task_param=cfg,
                               is_done=jnp.asarray(False))

    def init_step_state(self, theta, key, *, theta_is_vector=False):
        k_tasks, k_offset = jax.random.split(key)
        keys = jax.random.split(k_tasks, self.num_tasks)
        state = jax.vmap(self._init_single, in_axes=(0 if theta_is_vector else None, 0))(
            theta, keys)
        if self.random_initial_iteration_offset:
            offset = jax.random.randint(k_offset, (self.num_tasks,), 0,
                                        self.random_initial_iteration_offset, jnp.int32)
            state = state.replace(inner_step=offset)
        return state

    # -- data ---------------------------------------------------------------------------

    def get_data(self, trunc_length: int) -> dict[str, Any]:
        """Host side, once per unroll: device-resident pools or stacked host batches.

        Returns a dict `split -> ("pool", arrays, batch_size)`-like entries: pools
        (whole splits, put on the device on first use) are gathered inside `unroll`;
        host batches are `[trunc_length, num_tasks, batch, ...]`.
        """
        out = {}
        datasets = self.task_family.datasets
        for split in self._splits:
            it = datasets.split(split)
            if split in self._pools:
                if self._pools[split] is None:
                    self._pools[split] = jax.tree.map(jnp.asarray, dict(it.arrays))
                out[split] = {"pool": self._pools[split]}
            elif hasattr(it, "next_stacked"):
                out[split] = {"batches": it.next_stacked(trunc_length, self.num_tasks)}
            else:
                batches = [[next(it) for _ in range(self.num_tasks)] for _ in range(trunc_length)]
                out[split] = {"batches": jax.tree.map(lambda *xs: np.stack(xs),
                                                      *[jax.tree.map(lambda *ys: np.stack(ys), *row)
                                                        for row in batches])}
        return out

    def data_task_axes(self, data):
        return {split: ({"pool": jax.tree.map(lambda _: None, d["pool"])} if "pool" in d
                        else {"batches": jax.tree.map(lambda _: 1, d["batches"])})
                for split, d in data.items()}

    def _batches(self, data, split, key, trunc_length):
        """`[T, num_tasks, batch, ...]` examples of `split`."""
        entry = data[split]
        if "batches" in entry:
            return entry["batches"]
        pool = entry["pool"]
        num_examples = jax.tree.leaves(pool)[0].shape[0]
        batch_size = self.task_family.datasets.split(split).batch_size
        idx = jax.random.randint(key, (trunc_length, self.num_tasks, batch_size), 0,
                                 num_examples)
        return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), pool)

    # -- one inner step -----------------------------------------------------------------

    def _step_single(self, theta, state: LOptUnrollState, key, batch, meta_batch):
        k_reset, k_loss, k_trunc, k_meta = jax.random.split(key, 4)
        opt = self.learned_opt.opt_fn(theta, **self._opt_kwargs)
        task = self.task_family.task_fn(state.task_param)

        params = opt.get_params(state.opt_state)
        loss, grad = jax.value_and_grad(task.loss)(params, k_loss, batch)
        trained = opt.update(state.opt_state, grad, loss=loss)

        fresh_opt_state, fresh_cfg = self._fresh_run(theta, k_reset, state.trunc_state.length)
        opt_state = _select(state.is_done, fresh_opt_state, trained)
        task_param = _select(state.is_done, fresh_cfg, state.task_param)
        inner_step = jnp.where(state.is_done, 0, state.inner_step + 1).astype(jnp.int32)
        trunc_state, done = self.trunc_sched.next_state(state.trunc_state, inner_step, k_trunc)

        if meta_batch is not None:
            new_task = self.task_family.task_fn(task_param)
            loss = new_task.loss(opt.get_params(opt_state), k_meta, meta_batch)
        loss = jnp.where(state.is_done, 0.0, task.normalizer(loss)).astype(jnp.float32)

        new_state = LOptUnrollState(opt_state=opt_state, inner_step=inner_step,
                                    trunc_state=trunc_state, task_param=task_param,
                                    is_done=done)
        out = UnrollOut(loss=loss, mask=inner_step != 0, is_done=done, iteration=inner_step)
        return new_state, out

    # -- a truncation -------------------------------------------------------------------

    def unroll(self, theta, state, key, trunc_length, data=None, *, theta_is_vector=False,
               antithetic=False):
        data = {} if data is None else data
        missing = [s for s in self._splits if s not in data]
        if missing:
            raise ValueError(f"unroll needs data for splits {missing}: pass step.get_data(T)")
        k_data, k_meta_data, k_steps = jax.random.split(key, 3)
        batches = (self._batches(data, "train", k_data, trunc_length)
                   if "train" in self._splits else None)
        meta = (self._batches(data, self.meta_loss_split, k_meta_data, trunc_length)
                if self.meta_loss_split is not None else None)
        if antithetic:
            batches, meta = repeat_pairs((batches, meta), axis=1)
        keys = jax.random.split(k_steps, trunc_length)
        in_axes = (0 if theta_is_vector else None, 0, 0, 0, 0)
        vstep = local_tasks(jax.vmap(self._step_single, in_axes=in_axes), in_axes)

        def body(state, xs):
            step_key, batch, meta_batch = xs
            task_keys = jax.random.split(step_key, self.num_tasks)
            if antithetic:
                task_keys = repeat_pairs(task_keys)
            return vstep(theta, state, task_keys, batch, meta_batch)

        return jax.lax.scan(body, state, (keys, batches, meta))
