"""`single_task_training_curves`: train one task with one optimizer and record curves.

Same semantics and keys as learned_optimization's `eval_training.single_task_training_curves`
(the tutorial's baseline and evaluation tool):

    curves = single_task_training_curves(task, Adam(1e-3), num_steps=200, key=key,
                                         eval_every=10, eval_batches=5, last_eval_batches=20)
    curves["eval/xs"], curves["eval/train/loss"], curves["train/loss"], ...

Each `eval_every` training steps run as one jitted `lax.scan` fed by one
`next_stacked(eval_every)` fetch; evaluations are one jitted `vmap` of the loss over
stacked batches. The jitted functions are cached per (task, optimizer), so a sweep
over seeds compiles once.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax import lax

from lopt_fast.optimizers.base import Optimizer
from lopt_fast.tasks.base import Task

SPLITS = ("train", "inner_valid", "outer_valid", "test")
# Runs at least this long show a progress bar unless `progress=False`.
PROGRESS_MIN_STEPS = 500

_FN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Fns:
    """The jitted train-chunk and eval functions of one (task, optimizer) pair."""

    def __init__(self, task: Task, opt: Optimizer):
        def train_step(state, key_and_batch):
            key, batch = key_and_batch
            k_loss, k_opt = jax.random.split(key)
            params = opt.get_params(state)
            loss, grad = jax.value_and_grad(task.loss)(params, k_loss, batch)
            return opt.update(state, grad, loss=loss, key=k_opt), loss

        def train_chunk(state, keys, batches):
            return lax.scan(train_step, state, (keys, batches))

        def eval_loss(state, keys, batches):
            params = opt.get_params(state)
            return jnp.mean(jax.vmap(lambda k, b: task.loss(params, k, b))(keys, batches))

        self.train_chunk = jax.jit(train_chunk)
        self.eval_loss = jax.jit(eval_loss)


def _fns(task: Task, opt: Optimizer) -> _Fns:
    per_task = _FN_CACHE.setdefault(task, weakref.WeakKeyDictionary())
    if opt not in per_task:
        per_task[opt] = _Fns(task, opt)
    return per_task[opt]


def _check(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _stacked(task: Task, split: str, n: int) -> Any:
    """n batches of `split` stacked on a leading axis; None for data-free tasks."""
    if task.datasets is None:
        return None
    return task.datasets.split(split).next_stacked(n)


def single_task_training_curves(
    task: Task,
    opt: Optimizer,
    num_steps: int,
    key: jax.Array,
    eval_every: int = 10,
    eval_batches: int = 5,
    last_eval_batches: int = 20,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Train `task` with `opt` for `num_steps`, evaluating every `eval_every` steps.

    Args:
      task: the inner problem.
      opt: an `Optimizer` (baseline or `lopt.opt_fn(theta)`).
      num_steps: training steps.
      key: PRNG key (params init, per-step keys, eval keys).
      eval_every: steps between evaluations (also at step 0 and at the end).
      eval_batches: batches averaged per split at each evaluation.
      last_eval_batches: batches averaged per split at the final evaluation.
      progress: show a tqdm bar; None shows one for runs >= `PROGRESS_MIN_STEPS` steps.

    Returns:
      numpy arrays: `train/xs`, `train/loss` (every step); `eval/xs` and, for each
      split the task has, `eval/<split>/loss`; `eval/last_eval/<split>/loss` (scalars
      from the final evaluation with `last_eval_batches`).

    Example:
        curves = single_task_training_curves(DigitsMLP(), Adam(1e-3), 200, jax.random.key(0))
    """
    num_steps = _check("num_steps", num_steps, 1)
    eval_every = _check("eval_every", eval_every, 1)
    eval_batches = _check("eval_batches", eval_batches, 1)
    last_eval_batches = _check("last_eval_batches", last_eval_batches, 1)
    fns = _fns(task, opt)
    splits = ("train",) if task.datasets is None else SPLITS

    key_init, key_opt, key, key_eval = jax.random.split(key, 4)
    state = opt.init(task.init(key_init), num_steps=num_steps, key=key_opt)

    def evaluate(state, key, n):
        keys = jax.random.split(key, (len(splits), n))
        return {s: float(fns.eval_loss(state, keys[i], _stacked(task, s, n)))
                for i, s in enumerate(splits)}

    eval_xs, evals, train_losses = [0], [evaluate(state, jax.random.fold_in(key_eval, 0), eval_batches)], []
    show = num_steps >= PROGRESS_MIN_STEPS if progress is None else progress
    bar = tqdm.tqdm(total=num_steps, desc=f"train {opt!r}", disable=not show, leave=False)
    step = 0
    while step < num_steps:
        n = min(eval_every, num_steps - step)
        keys = jax.random.split(jax.random.fold_in(key, step), n)
        state, losses = fns.train_chunk(state, keys, _stacked(task, "train", n))
        train_losses.append(np.asarray(losses))
        step += n
        bar.update(n)
        last = step == num_steps
        eval_xs.append(step)
        evals.append(evaluate(state, jax.random.fold_in(key_eval, step),
                              last_eval_batches if last else eval_batches))
    bar.close()

    curves = {"train/xs": np.arange(num_steps), "train/loss": np.concatenate(train_losses),
              "eval/xs": np.asarray(eval_xs)}
    for s in splits:
        curves[f"eval/{s}/loss"] = np.asarray([e[s] for e in evals])
        curves[f"eval/last_eval/{s}/loss"] = np.asarray(evals[-1][s])
    return curves
