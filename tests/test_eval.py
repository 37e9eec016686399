"""single_task_training_curves and the plotting helpers, on a synthetic regression task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast.eval import (
    best_lr,
    plot_lr_sweep,
    plot_training_curves,
    single_task_training_curves,
    summarize_curves,
)
from lopt_fast.optimizers import SGD, Adam
from lopt_fast.tasks import BatchIterator, Datasets, Task


class Regression(Task):
    """Linear least squares on fixed random data, served by BatchIterators."""

    name = "regression"

    def __init__(self, seed=0, batch_size=16):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(5, 1)).astype(np.float32)

        def split(n, s):
            x = rng.normal(size=(n, 5)).astype(np.float32)
            return BatchIterator({"x": x, "y": x @ w}, batch_size, seed=s)

        self.datasets = Datasets(split(256, 1), split(64, 2), split(64, 3), split(64, 4))

    def init(self, key):
        return {"w": jax.random.normal(key, (5, 1)), "b": jnp.zeros(1)}

    def loss(self, params, key, batch):
        return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


class DataFree(Task):
    name = "bowl"

    def init(self, key):
        return jax.random.normal(key, (3,))

    def loss(self, params, key, batch):
        return jnp.sum(params**2)


def test_keys_shapes_and_progress():
    curves = single_task_training_curves(Regression(), Adam(3e-2), num_steps=23, key=jax.random.key(0),
                                         eval_every=5, eval_batches=2, last_eval_batches=4)
    np.testing.assert_array_equal(curves["eval/xs"], [0, 5, 10, 15, 20, 23])
    np.testing.assert_array_equal(curves["train/xs"], np.arange(23))
    assert curves["train/loss"].shape == (23,)
    for split in ("train", "inner_valid", "outer_valid", "test"):
        ys = curves[f"eval/{split}/loss"]
        assert ys.shape == (6,) and np.all(np.isfinite(ys)), split
        assert curves[f"eval/last_eval/{split}/loss"] == ys[-1]
    assert curves["eval/train/loss"][-1] < 0.3 * curves["eval/train/loss"][0]


def test_matches_a_python_loop():
    """The scanned chunks are the same computation as a plain per-step loop."""
    task, opt = Regression(seed=3), SGD(0.05)
    key = jax.random.key(1)
    curves = single_task_training_curves(task, opt, num_steps=12, key=key, eval_every=4,
                                         eval_batches=1, last_eval_batches=1)
    # Replay: same key schedule, same batches (a fresh task has the same iterator seeds).
    task2 = Regression(seed=3)
    key_init, key_opt, key, _ = jax.random.split(key, 4)
    state = opt.init(task2.init(key_init), num_steps=12, key=key_opt)
    next(task2.datasets.train)  # the step-0 evaluation drew one train batch
    losses = []
    for chunk_start in range(0, 12, 4):
        keys = jax.random.split(jax.random.fold_in(key, chunk_start), 4)
        batches = task2.datasets.train.next_stacked(4)
        for i in range(4):
            k_loss, k_opt = jax.random.split(keys[i])
            batch = {k: v[i] for k, v in batches.items()}
            loss, grad = jax.value_and_grad(task2.loss)(opt.get_params(state), k_loss, batch)
            state = opt.update(state, grad, loss=loss, key=k_opt)
            losses.append(float(loss))
        next(task2.datasets.train)  # the evaluation after the chunk
    np.testing.assert_allclose(curves["train/loss"], losses, rtol=1e-5)


def test_seeds_do_not_recompile():
    task, opt = Regression(), Adam(1e-2)
    single_task_training_curves(task, opt, 10, jax.random.key(0), eval_every=5)
    from lopt_fast.eval.training_curves import _fns

    fns = _fns(task, opt)
    sizes = (fns.train_chunk._cache_size(), fns.eval_loss._cache_size())
    for seed in range(1, 4):
        single_task_training_curves(task, opt, 10, jax.random.key(seed), eval_every=5)
    assert (fns.train_chunk._cache_size(), fns.eval_loss._cache_size()) == sizes


def test_data_free_task():
    curves = single_task_training_curves(DataFree(), SGD(0.1), 20, jax.random.key(2), eval_every=10)
    assert set(k for k in curves if k.startswith("eval/") and k.endswith("loss")) == {
        "eval/train/loss", "eval/last_eval/train/loss"}
    assert curves["eval/train/loss"][-1] < 0.1 * curves["eval/train/loss"][0]


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps"), ({"eval_every": 0}, "eval_every"),
    ({"eval_batches": -1}, "eval_batches"), ({"num_steps": 2.5}, "num_steps"),
])
def test_bad_arguments(kwargs, match):
    args = {"num_steps": 5, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        single_task_training_curves(DataFree(), SGD(0.1), **args)


def test_plots_and_summaries(tmp_path):
    task = Regression()
    sweep = {lr: [single_task_training_curves(task, Adam(lr), 10, jax.random.key(s), eval_every=5)
                  for s in range(2)] for lr in (1e-3, 3e-2)}
    assert best_lr(sweep, "mean") == 3e-2
    s = summarize_curves(sweep[3e-2])
    assert s["final_train_loss"] < s["mean_train_loss"]
    for path in (plot_lr_sweep(sweep, tmp_path / "sweep.png", other={"sgd": sweep[1e-3]}),
                 plot_training_curves({"adam": sweep[3e-2]}, tmp_path / "curves.png")):
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
