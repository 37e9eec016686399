"""`single_task_training_curves`: train one task with one optimizer and record curves.

The semantics and returned keys follow learned_optimization's
`eval_training.single_task_training_curves` (the tutorial's baseline and evaluation tool):

    curves = single_task_training_curves(task, Adam(1e-3), num_steps=200, key=key,
                                         eval_every=5, eval_batches=10, last_eval_batches=30)
    plt.plot(curves["eval/xs"], curves["eval/train/loss"])

Speed: every `eval_every` training steps run as one jitted `lax.scan` fed by a single
`next_stacked(eval_every)` fetch, and each evaluation is one jitted call that `vmap`s the
loss over the stacked batches of every split. The jitted functions are cached per
(task, optimizer) object pair, so a sweep over seeds compiles once; PRNG keys are
derived inside jit, so the host loop does nothing per step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from lopt_fast.optimizers.base import Optimizer
from lopt_fast.tasks.base import Task

# All split names a `Datasets` has.
SPLITS = ("train", "inner_valid", "outer_valid", "test")
# The splits learned_optimization's `single_task_training_curves` evaluates.
DEFAULT_SPLITS = ("train", "outer_valid", "test")
# With `progress=None`, runs at least this long show a progress bar.
PROGRESS_MIN_STEPS = 500


class _Fns:
    """The jitted train-chunk and eval functions of one (task, optimizer) pair.

    The closures hold the task and optimizer through weak references: the cache entry
    must not keep its own keys alive (it is dropped when either object dies). Tracing
    only happens inside a call, while both are alive.
    """

    def __init__(self, task_ref: Callable[[], Task], opt_ref: Callable[[], Optimizer]):
        self.traces = 0  # Python-side trace counter (tests check seeds don't retrace).

        def train_chunk(state, key, step, batches, n):
            self.traces += 1
            task, opt = task_ref(), opt_ref()
            # One key per step, derived on device from (run key, first step of the chunk).
            keys = jax.random.split(jax.random.fold_in(key, step), n)

            def train_step(state, key_and_batch):
                key, batch = key_and_batch
                k_loss, k_opt = jax.random.split(key)
                loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), k_loss, batch)
                return opt.update(state, grad, loss=loss, key=k_opt), loss

            # `length` is needed when `batches` is None (data-free tasks).
            return lax.scan(train_step, state, (keys, batches), length=n)

        def evaluate(state, key, step, part, batches_by_split, weights):
            """Weighted sums of the loss and normalised loss over `len(weights)` batches.

            The weights (1 or 0) let a different batch count (the final evaluation's)
            reuse this compiled function on padded batches instead of compiling anew.
            """
            self.traces += 1
            task, opt = task_ref(), opt_ref()
            params = opt.get_params(state)
            normalizer = getattr(task, "normalizer", lambda x: x)
            key = jax.random.fold_in(jax.random.fold_in(key, step), part)
            keys = jax.random.split(key, (len(batches_by_split), len(weights)))
            out = {}
            for i, (split, batches) in enumerate(sorted(batches_by_split.items())):
                losses = jax.vmap(lambda k, b: task.loss(params, k, b))(keys[i], batches)
                # As learned_optimization: normalise each batch's loss, then average.
                norm = jax.vmap(normalizer)(losses)
                out[split] = jnp.stack([jnp.sum(weights * losses), jnp.sum(weights * norm)])
            return out

        self.train_chunk = jax.jit(train_chunk, static_argnames="n")
        self.evaluate = jax.jit(evaluate)


# (id(task), id(opt)) -> _Fns; entries are removed when either object is collected.
_FN_CACHE: dict[tuple[int, int], _Fns] = {}


def _fns(task: Task, opt: Optimizer) -> _Fns:
    """The cached jitted functions for (task, opt): compiled once per pair, not per call."""
    cache_key = (id(task), id(opt))
    fns = _FN_CACHE.get(cache_key)
    if fns is None:
        try:
            fns = _Fns(weakref.ref(task), weakref.ref(opt))
        except TypeError:  # Not weak-referenceable (e.g. __slots__): compile per call.
            return _Fns(lambda: task, lambda: opt)
        _FN_CACHE[cache_key] = fns
        for obj in (task, opt):
            weakref.finalize(obj, _FN_CACHE.pop, cache_key, None)
    return fns


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_key(key: Any) -> jax.Array:
    is_typed = (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                and key.ndim == 0)
    is_raw = isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.ndim == 1
    if not (is_typed or is_raw):
        raise ValueError(
            "key must be a single JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {type(key).__name__} {getattr(key, 'shape', '')}".rstrip()
        )
    return jnp.asarray(key) if is_raw else key


def _check_splits(task: Task, splits: Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; expected a subset of {SPLITS}")
    # Data-free tasks have a single loss: evaluating other splits would only repeat it.
    return ("train",) if task.datasets is None else tuple(dict.fromkeys(splits))


def _stacked(it: Iterator[Any], n: int) -> Any:
    """`n` batches of `it` stacked on a new leading axis, in one fetch when possible."""
    if hasattr(it, "next_stacked"):
        return it.next_stacked(n)
    # Any other iterator of pytrees of arrays: stack n successive batches.
    return jax.tree.map(lambda *xs: np.stack(xs), *[next(it) for _ in range(n)])


def _pad(batches: Any, n: int) -> Any:
    """Pad stacked batches to `n` on the leading axis by repeating the first (weighted 0)."""
    def pad(x):
        return x if len(x) == n else np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])

    return jax.tree.map(pad, batches)


def single_task_training_curves(
    task: Task,
    opt: Optimizer,
    num_steps: int,
    key: jax.Array,
    eval_every: int = 10,
    eval_batches: int = 5,
    last_eval_batches: int = 20,
    progress: bool | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
) -> dict[str, np.ndarray]:
    """Train `task` with `opt` for `num_steps` steps, evaluating every `eval_every` steps.

    Each step computes the loss and gradient of `task.loss` on a fresh train batch and
    applies `opt.update(state, grad, loss=loss, key=...)`. Before step 0, after every
    `eval_every` steps and after the last step, the loss is averaged over `eval_batches`
    batches of each split (`last_eval_batches` for the final evaluation).

    Differences from learned_optimization: the final evaluation always happens (theirs
    only when `eval_every` divides `num_steps`), exactly `num_steps` training steps run
    (theirs runs one more after the final evaluation), and data-free tasks
    (`task.datasets is None`, given `None` batches) are evaluated on "train" only.
    Results are not bitwise equal to theirs (different key derivation).

    Args:
      task: the inner problem.
      opt: an `Optimizer` (a baseline such as `Adam(1e-3)` or `lopt.opt_fn(theta)`).
        Reuse the same object across seeds: compiled code is cached per (task, opt).
      num_steps: training steps, >= 1.
      key: PRNG key for the parameter init, optimizer init, per-step and eval keys.
      eval_every: training steps between evaluations, >= 1.
      eval_batches: batches averaged per split at each evaluation, >= 1.
      last_eval_batches: batches averaged per split at the final evaluation, >= 1.
      progress: show a tqdm bar; None shows one for runs of at least
        `PROGRESS_MIN_STEPS` steps.
      splits: splits to evaluate; defaults to learned_optimization's
        ("train", "outer_valid", "test"); "inner_valid" may be added.

    Returns:
      A dict of numpy arrays, with learned_optimization's keys:
        `train/xs`, `train/loss`: step index and training loss of every step, [num_steps].
        `eval/xs`: steps at which evaluations ran: 0, eval_every, ..., num_steps.
        `eval/<split>/loss`, `eval/<split>/loss_normalized`: mean (normalised, see
          `Task.normalizer`) loss per evaluation, aligned with `eval/xs`.
        `eval/eval_batches`, `eval/last_eval_batches`: the batch counts used (scalars).

    Raises:
      ValueError: on a non-positive or non-integer count, a bad key or unknown splits.

    Example:
        >>> task, opt = DigitsMLP(), Adam(3e-3)
        >>> curves = [single_task_training_curves(task, opt, 200, jax.random.key(s), eval_every=5)
        ...           for s in range(5)]  # compiles once, on the first seed
        >>> curves[0]["eval/xs"][:3], curves[0]["eval/train/loss"].shape
        (array([ 0,  5, 10]), (41,))
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    eval_every = _check_int("eval_every", eval_every, 1)
    eval_batches = _check_int("eval_batches", eval_batches, 1)
    last_eval_batches = _check_int("last_eval_batches", last_eval_batches, 1)
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None, got {progress!r}")
    key = _check_key(key)
    splits = _check_splits(task, splits)
    fns = _fns(task, opt)
    data = task.datasets

    key_init, key_opt, key_train, key_eval = jax.random.split(key, 4)
    state = opt.init(task.init(key_init), num_steps=num_steps, key=key_opt)

    def evaluate(state, step, n):
        """Device arrays of loss sums per split over `n` batches, fetched `eval_batches` at a time."""
        parts = []
        for part, start in enumerate(range(0, n, eval_batches)):
            m = min(eval_batches, n - start)
            batches = {s: None if data is None else _pad(_stacked(data.split(s), m), eval_batches)
                       for s in splits}
            weights = (np.arange(eval_batches) < m).astype(np.float32)
            parts.append(fns.evaluate(state, key_eval, step, part, batches, weights))
        return parts, n

    eval_xs, evals, train_losses = [0], [evaluate(state, 0, eval_batches)], []
    show = num_steps >= PROGRESS_MIN_STEPS if progress is None else progress
    with tqdm(total=num_steps, desc=f"train {opt!r}", disable=not show, leave=False) as bar:
        step = 0
        while step < num_steps:
            n = min(eval_every, num_steps - step)
            batches = None if data is None else _stacked(data.train, n)
            state, losses = fns.train_chunk(state, key_train, step, batches, n=n)
            if train_losses:  # Wait one chunk behind: the host fetches batches meanwhile.
                train_losses[-1].block_until_ready()
                bar.update(len(train_losses[-1]))
            train_losses.append(losses)
            step += n
            evals.append(evaluate(state, step, last_eval_batches if step == num_steps else eval_batches))
            eval_xs.append(step)
        train_losses, evals = jax.device_get((train_losses, evals))  # one sync at the end
        bar.update(len(train_losses[-1]))

    curves = {
        "train/xs": np.arange(num_steps),
        "train/loss": np.concatenate(train_losses),
        "eval/xs": np.asarray(eval_xs),
        "eval/last_eval_batches": np.asarray(last_eval_batches),
        "eval/eval_batches": np.asarray(eval_batches),
    }
    for s in splits:
        # [num_evals, 2]: (loss, normalised loss) averaged over each evaluation's batches.
        means = np.asarray([sum(p[s] for p in parts) / n for parts, n in evals], np.float32)
        curves[f"eval/{s}/loss"] = means[:, 0]
        curves[f"eval/{s}/loss_normalized"] = means[:, 1]
    return curves
