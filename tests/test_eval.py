"""`lopt_fast.eval`: training curves and plots, on synthetic tasks defined here."""

import gc

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
from lopt_fast.eval import training_curves as tc
from lopt_fast.optimizers import SGD, Adam
from lopt_fast.tasks.base import Datasets, Task
from lopt_fast.tasks.data import BatchIterator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Regression(Task):
    """Linear least squares on fixed random data; each split is a seeded BatchIterator."""

    name = "regression"

    def __init__(self, seed=0, batch_size=16, wrap=lambda name, it: it):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(5, 1)).astype(np.float32)

        def split(name, n, s):
            x = rng.normal(size=(n, 5)).astype(np.float32)
            return wrap(name, BatchIterator({"x": x, "y": x @ w}, batch_size, seed=s))

        self.datasets = Datasets(split("train", 256, 1), split("inner_valid", 64, 2),
                                 split("outer_valid", 64, 3), split("test", 64, 4))

    def init(self, key):
        return {"w": jax.random.normal(key, (5, 1)), "b": jnp.zeros(1)}

    def loss(self, params, key, batch):
        del key
        return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)

    def normalizer(self, loss):
        return jnp.clip(loss, 0.0, 1.0)


class NoisyBowl(Task):
    """Data-free: `sum(p**2)` plus a little key-dependent noise."""

    name = "bowl"

    def init(self, key):
        return jax.random.normal(key, (3,))

    def loss(self, params, key, batch):
        assert batch is None
        return jnp.sum(params**2) + 1e-3 * jax.random.normal(key)


# Shared across tests so the jitted functions compile once per pair (keeps the file fast).
TASK, ADAM = Regression(), Adam(0.1)


def _run(task=TASK, opt=ADAM, num_steps=23, seed=0, **kwargs):
    kwargs = {"eval_every": 5, "eval_batches": 2, "last_eval_batches": 4} | kwargs
    return single_task_training_curves(task, opt, num_steps, jax.random.key(seed), **kwargs)


def test_keys_shapes_and_learning():
    curves = _run()
    splits = ("train", "outer_valid", "test")  # learned_optimization's default splits
    assert set(curves) == {"train/xs", "train/loss", "eval/xs", "eval/eval_batches",
                           "eval/last_eval_batches"} | {
        f"eval/{s}/{k}" for s in splits for k in ("loss", "loss_normalized")}
    np.testing.assert_array_equal(curves["eval/xs"], [0, 5, 10, 15, 20, 23])
    np.testing.assert_array_equal(curves["train/xs"], np.arange(23))
    assert curves["train/loss"].shape == (23,)
    assert curves["eval/eval_batches"] == 2 and curves["eval/last_eval_batches"] == 4
    for s in splits:
        loss, norm = curves[f"eval/{s}/loss"], curves[f"eval/{s}/loss_normalized"]
        assert loss.shape == norm.shape == (6,) and np.all(np.isfinite(loss)), s
        assert np.all(norm <= np.minimum(loss, 1.0) + 1e-6), s
        assert loss[-1] < 0.1 * loss[0], s  # Adam fits the regression
    assert np.all(np.isfinite(curves["train/loss"]))
    assert curves["train/loss"][-5:].mean() < 0.1 * curves["train/loss"][:5].mean()


def test_inner_valid_split_and_eval_every_beyond_num_steps():
    curves = _run(num_steps=3, eval_every=10, splits=("train", "inner_valid"))
    np.testing.assert_array_equal(curves["eval/xs"], [0, 3])
    assert {k for k in curves if k.endswith("/loss")} == {"train/loss", "eval/train/loss",
                                                          "eval/inner_valid/loss"}


class _Recorder:
    """Wraps an iterator and records every batch it serves, in order."""

    def __init__(self, it, stacked):
        self.it, self.log = it, []
        if stacked:  # only some splits get `next_stacked`, to exercise the fallback too
            self.next_stacked = self._next_stacked

    def __next__(self):
        batch = next(self.it)
        self.log.append(batch)
        return batch

    def _next_stacked(self, n):
        batches = self.it.next_stacked(n)
        self.log += [{k: v[i] for k, v in batches.items()} for i in range(n)]
        return batches


def test_matches_a_python_loop():
    """Same numbers as a plain per-step loop over the batches the function consumed."""
    recorders = {}

    def wrap(name, it):
        recorders[name] = _Recorder(it, stacked=name != "test")
        return recorders[name]

    task, opt = Regression(seed=3, wrap=wrap), Adam(5e-2)
    num_steps, eval_every, eval_batches, last = 11, 4, 2, 5
    key = jax.random.key(1)
    curves = single_task_training_curves(task, opt, num_steps, key, eval_every=eval_every,
                                         eval_batches=eval_batches, last_eval_batches=last)

    # Replay, in the documented order: evaluate at step 0, then per chunk train and evaluate.
    queues = {s: list(r.log) for s, r in recorders.items()}
    take = lambda split, n: [queues[split].pop(0) for _ in range(n)]
    state = opt.init(task.init(jax.random.split(key, 4)[0]), num_steps=num_steps)
    evals, train_losses = {s: [] for s in ("train", "outer_valid", "test")}, []

    # One step or one batch per call (jitted only to skip eager dispatch).
    loss_fn = jax.jit(lambda state, b: task.loss(opt.get_params(state), None, b))

    @jax.jit
    def step_fn(state, batch):
        loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), None, batch)
        return opt.update(state, grad, loss=loss), loss

    def evaluate(n):
        for split, values in evals.items():
            losses = [loss_fn(state, b) for b in take(split, n)]
            values.append((np.mean(losses), np.mean([task.normalizer(x) for x in losses])))

    evaluate(eval_batches)
    for start in range(0, num_steps, eval_every):
        for batch in take("train", min(eval_every, num_steps - start)):
            state, loss = step_fn(state, batch)
            train_losses.append(float(loss))
        evaluate(last if start + eval_every >= num_steps else eval_batches)

    assert all(not q for q in queues.values()), "the function fetched unexpected batches"
    assert not recorders["inner_valid"].log  # not a default split
    np.testing.assert_allclose(curves["train/loss"], train_losses, rtol=2e-5)
    for split, values in evals.items():
        np.testing.assert_allclose(curves[f"eval/{split}/loss"], [v[0] for v in values], rtol=2e-5)
        np.testing.assert_allclose(curves[f"eval/{split}/loss_normalized"], [v[1] for v in values],
                                   rtol=2e-5)


def test_new_seeds_do_not_recompile():
    first = _run(seed=0)
    fns = tc._fns(TASK, ADAM)
    traces = fns.traces
    for seed in (1, 2):
        other = _run(seed=seed)
        assert other["eval/train/loss"][0] != first["eval/train/loss"][0]  # a different init
    assert fns.traces == traces, "a new key retraced the jitted functions"
    assert fns.train_chunk._cache_size() == 2  # the full chunk of 5 and the last one of 3
    # A legacy uint32 key (the tutorial's jax.random.PRNGKey) works too.
    legacy = single_task_training_curves(TASK, ADAM, 5, jax.random.PRNGKey(0), eval_every=5)
    assert np.isfinite(legacy["eval/train/loss"]).all()


def test_data_free_task_and_cache_release():
    task, opt = NoisyBowl(), SGD(0.1)
    curves = single_task_training_curves(task, opt, 20, jax.random.key(2), eval_every=10)
    again = single_task_training_curves(task, opt, 20, jax.random.key(2), eval_every=10)
    other = single_task_training_curves(task, opt, 20, jax.random.key(3), eval_every=10)
    for k in curves:  # without data, the key alone determines the run
        np.testing.assert_array_equal(curves[k], again[k])
    assert not np.allclose(curves["train/loss"], other["train/loss"])
    assert {k for k in curves if k.startswith("eval/") and "loss" in k} == {
        "eval/train/loss", "eval/train/loss_normalized"}
    np.testing.assert_array_equal(curves["eval/xs"], [0, 10, 20])
    assert curves["eval/train/loss"][-1] < 0.1 * curves["eval/train/loss"][0]
    # The cache holds its task and optimizer weakly: it empties when they are dropped.
    cache_key = (id(task), id(opt))
    assert cache_key in tc._FN_CACHE
    del task, opt, curves, again, other
    gc.collect()
    assert cache_key not in tc._FN_CACHE


def test_progress_bar(capsys):
    _run(num_steps=10, progress=True)
    assert "train Adam(lr=0.1)" in capsys.readouterr().err
    _run(num_steps=10)  # short runs are quiet by default
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps"), ({"num_steps": 2.5}, "num_steps"),
    ({"num_steps": True}, "num_steps"), ({"eval_every": 0}, "eval_every"),
    ({"eval_batches": -1}, "eval_batches"), ({"last_eval_batches": 0}, "last_eval_batches"),
    ({"key": 0}, "key"), ({"key": jax.random.split(jax.random.key(0))}, "key"),
    ({"splits": ("train", "valid")}, "split"), ({"splits": "train"}, "splits"),
    ({"progress": "yes"}, "progress"),
])
def test_bad_arguments(kwargs, match):
    args = {"num_steps": 5, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        single_task_training_curves(TASK, ADAM, **args)


def _fake_curves(final, seeds=3, steps=200, every=5):
    """Exponential-decay curves ending at `final` (NaN/inf for a diverged run)."""
    xs = np.arange(0, steps + 1, every)
    out = []
    for s in range(seeds):
        ys = final + (2.3 - final) * np.exp(-xs / 40.0) + 0.01 * s if np.isfinite(final) else (
            np.full(xs.shape, final))
        out.append({"eval/xs": xs, "eval/train/loss": ys})
    return out


def test_summaries_and_best_lr():
    curves = _fake_curves(1.0)
    s = summarize_curves(curves)
    assert s["final_train_loss"] == pytest.approx(1.0 + 1.3 * np.exp(-5) + 0.01)
    assert s["final_train_loss"] < s["mean_train_loss"] < 2.3
    sweep = {1e-4: _fake_curves(2.0), 1e-3: _fake_curves(1.0), 1e-2: _fake_curves(np.nan)}
    assert best_lr(sweep) == 1e-3 and best_lr(sweep, "final") == 1e-3
    with pytest.raises(ValueError, match="metric"):
        best_lr(sweep, "median")
    with pytest.raises(ValueError, match="eval/xs"):
        summarize_curves([curves[0], _fake_curves(1.0, steps=100)[0]])


def test_plots_write_pngs(tmp_path):
    sweep = {lr: _fake_curves(f) for lr, f in
             [(1e-4, 2.0), (1e-3, 1.2), (3e-3, 0.9), (1e-2, 1.5), (3e-2, np.inf)]}
    other = {"learned": _fake_curves(0.7)}
    paths = [plot_lr_sweep(sweep, tmp_path / "sweep.png", other=other, title="sweep"),
             plot_training_curves({"Adam 3e-3": sweep[3e-3], **other}, tmp_path / "sub/c.png",
                                  logy=True)]
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
