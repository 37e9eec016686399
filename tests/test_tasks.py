"""Tests of the task layer: data, shapes, trainability, families, registry, CIFAR loading."""

from __future__ import annotations

import importlib.resources
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast import tasks
from lopt_fast.optimizers import Adam
from lopt_fast.tasks import digits as digits_lib
from lopt_fast.tasks.cifar10 import DatasetNotFoundError


def _adam_losses(task, num_steps: int, lr: float, seed: int = 0):
    """Train loss before the first and after the last of `num_steps` Adam steps."""
    key = jax.random.key(seed)
    opt = Adam(lr)
    state = opt.init(task.init(key))
    if task.datasets is not None:
        batches = jax.tree.map(jnp.asarray, task.datasets.train.next_stacked(num_steps))
    else:
        batches = None

    def step(state, batch):
        loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), key, batch)
        return opt.update(state, grad, loss=loss), loss

    state, losses = jax.jit(lambda s, b: jax.lax.scan(step, s, b, length=num_steps))(state, batches)
    fixed = None if task.datasets is None else jax.tree.map(lambda a: a[0], batches)
    return float(losses[0]), float(task.loss(opt.get_params(state), key, fixed))


# -- BatchIterator ----------------------------------------------------------------------


def test_batch_iterator_shapes_and_epochs():
    arrays = {"x": np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
              "y": np.arange(10, dtype=np.int32)}
    it = tasks.BatchIterator(arrays, batch_size=2, seed=0)
    b = next(it)
    assert b["x"].shape == (2, 3) and b["y"].shape == (2,)
    np.testing.assert_array_equal(b["x"][:, 0], b["y"])  # rows stay aligned across arrays

    it = tasks.BatchIterator(arrays, batch_size=2, seed=0)
    epoch = it.next_stacked(5)  # exactly one epoch: every example once
    assert epoch["x"].shape == (5, 2, 3)
    assert sorted(epoch["y"].ravel().tolist()) == list(range(10))
    stacked = it.next_stacked(3, 4)  # crosses into the next epochs
    assert stacked["y"].shape == (3, 4, 2)
    assert sorted(stacked["y"].ravel()[:10].tolist()) == list(range(10))

    with pytest.raises(ValueError, match="batch_size"):
        tasks.BatchIterator(arrays, batch_size=11)


# -- digits -----------------------------------------------------------------------------


def test_digits_splits_are_a_disjoint_partition():
    splits = digits_lib.load_digits()
    assert {k: len(v["label"]) for k, v in splits.items()} == digits_lib.SPLIT_SIZES
    ref = importlib.resources.files("lopt_fast.tasks").joinpath("data/digits.npz")
    with ref.open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16

    def rows(imgs, labs):
        flat = np.concatenate([np.rint(imgs.reshape(len(imgs), -1)), labs[:, None]], axis=1)
        return sorted(map(tuple, flat.astype(np.int64).tolist()))

    # The splits together are the whole data set, each example exactly once.
    together = rows(np.concatenate([s["image"] * 16 for s in splits.values()]),
                    np.concatenate([s["label"] for s in splits.values()]))
    assert together == rows(images.astype(np.float32), labels.astype(np.int64))
    # ... and the split does not depend on the task seed.
    np.testing.assert_array_equal(tasks.DigitsMLP(seed=3).datasets.test.arrays["label"],
                                  splits["test"]["label"])


@pytest.mark.parametrize("ctor", [tasks.DigitsMLP, tasks.DigitsConv])
def test_digits_batches_and_params(ctor):
    task = ctor()
    batch = next(task.datasets.train)
    assert batch["image"].shape == (128, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(np.unique(batch["label"])) <= set(range(10))
    for split in ("inner_valid", "outer_valid", "test"):
        assert next(task.datasets.split(split))["image"].shape == (128, 8, 8, 1)

    params = task.init(jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, params)
    if ctor is tasks.DigitsMLP:
        assert shapes == {"linear_0": {"w": (64, 32), "b": (32,)},
                          "linear_1": {"w": (32, 32), "b": (32,)},
                          "linear_2": {"w": (32, 10), "b": (10,)}}
    else:
        assert shapes == {"conv2_d": {"w": (3, 3, 1, 16), "b": (16,)},
                          "conv2_d_1": {"w": (3, 3, 16, 32), "b": (32,)},
                          "linear": {"w": (32, 10), "b": (10,)}}
    loss = jax.jit(task.loss)(params, jax.random.key(1), batch)
    assert loss.shape == () and np.isfinite(loss)
    assert abs(float(loss) - math.log(10)) < 0.5  # near chance at init
    assert float(task.normalizer(jnp.asarray(100.0))) == pytest.approx(1.5 * math.log(10))
    assert float(task.normalizer(jnp.asarray(-1.0))) == 0.0


def test_digits_seeds_change_batch_order_only():
    a, b, c = (next(tasks.DigitsMLP(seed=s).datasets.train)["image"] for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name,lr", [("digits_mlp", 1e-2), ("digits_conv", 1e-2), ("quadratic", 0.1)])
def test_adam_lowers_the_loss(name, lr):
    first, last = _adam_losses(tasks.get_task(name), num_steps=20, lr=lr)
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


def test_conv_im2col_matches_lax_conv():
    conv = jax.jit(digits_lib.conv2d, static_argnames=("stride", "impl"))
    rng = np.random.default_rng(0)
    for shape, stride in [((3, 8, 8, 4), 1), ((2, 7, 5, 3), 2)]:  # even and odd padding
        x = rng.normal(size=shape).astype(np.float32)
        p = {"w": rng.normal(size=(3, 3, shape[-1], 6)).astype(np.float32),
             "b": np.arange(6, dtype=np.float32)}
        a = conv(x, p, stride, impl="lax")
        b = conv(x, p, stride, impl="im2col")
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


# -- quadratics -------------------------------------------------------------------------


def test_quadratic_task_matches_learned_optimization():
    task = tasks.QuadraticTask(dim=10)
    assert task.datasets is None
    x = task.init(jax.random.key(0))
    assert x.shape == (10,)
    np.testing.assert_allclose(task.loss(x, jax.random.key(1), None), jnp.sum(x**2), rtol=1e-6)


def test_quadratic_family_is_vmappable():
    family = tasks.QuadraticFamily(dim=5)
    assert family.datasets is None
    keys = jax.random.split(jax.random.key(0), 8)

    def loss_of(key):
        cfg = family.sample(key)
        task = family.task_fn(cfg)
        return task.loss(task.init(key), key, None), cfg

    losses, cfgs = jax.jit(jax.vmap(loss_of))(keys)
    assert losses.shape == (8,) and bool(jnp.all(jnp.isfinite(losses)))
    assert cfgs["scale"].shape == (8, 5) and cfgs["center"].shape == (8, 5)
    assert bool(jnp.all((cfgs["scale"] >= 0.1 - 1e-6) & (cfgs["scale"] <= 10.0 + 1e-6)))
    # The minimum is at the sampled center.
    cfg = family.sample(keys[0])
    assert float(family.task_fn(cfg).loss(cfg["center"], keys[0], None)) == 0.0
    # A single task as a family (the meta-trainer's wrapping of plain tasks).
    single = tasks.single_task_to_family(tasks.QuadraticTask())
    assert single.task_fn(single.sample(keys[0])).loss(jnp.ones(10), keys[0], None) == 10.0


# -- registry ---------------------------------------------------------------------------


def test_registry():
    assert set(tasks.TASKS) == {"digits_mlp", "digits_conv", "cifar10_conv", "quadratic"}
    for name in tasks.TASKS:
        task = tasks.get_task(name)  # CIFAR builds lazily: no data needed here
        assert isinstance(task, tasks.Task) and task.name == name
    assert tasks.get_task("digits_mlp", hidden=(8,)).init(jax.random.key(0))["linear_0"]["w"].shape \
        == (64, 8)
    with pytest.raises(ValueError, match="unknown task 'nope'; valid names: digits_mlp") as e:
        tasks.get_task("nope")
    assert "\n" not in str(e.value)


def test_importing_does_not_import_optional_dependencies():
    import subprocess
    import sys

    code = ("import sys, lopt_fast, lopt_fast.tasks; "
            "print('tensorflow_datasets' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- CIFAR-10 ---------------------------------------------------------------------------


def test_cifar10_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    task = tasks.Conv_Cifar10_16_32x64x64()
    assert task._datasets is None  # lazy
    params = task.init(jax.random.key(0))
    assert jax.tree.map(jnp.shape, params) == {
        "conv2_d": {"w": (3, 3, 3, 32), "b": (32,)},
        "conv2_d_1": {"w": (3, 3, 32, 64), "b": (64,)},
        "conv2_d_2": {"w": (3, 3, 64, 64), "b": (64,)},
        "linear": {"w": (64, 10), "b": (10,)},
    }
    with tfds.testing.mock_data(num_examples=256):
        datasets = task.datasets  # reads (fake) 32x32 CIFAR-10 through tfds.data_source
    assert task.datasets is datasets  # read once
    for split in ("train", "inner_valid", "outer_valid", "test"):
        batch = next(datasets.split(split))
        assert batch["image"].shape == (128, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(np.unique(batch["label"])) <= set(range(10))
    loss = jax.jit(task.loss)(params, jax.random.key(1), batch)
    assert np.isfinite(loss) and abs(float(loss) - math.log(10)) < 1.0


def test_cifar10_synthetic_data_needs_no_tfds(monkeypatch):
    from lopt_fast.tasks import cifar10

    def no_tfds():
        raise AssertionError("synthetic data must not read CIFAR-10")

    monkeypatch.setattr(cifar10, "_import_tfds", no_tfds)
    task = tasks.get_task("cifar10_conv", synthetic=True, batch_size=32)
    for split in ("train", "inner_valid", "outer_valid", "test"):
        batch = next(task.datasets.split(split))
        assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(np.unique(batch["label"])) <= set(range(10))
    assert np.isfinite(task.loss(task.init(jax.random.key(0)), jax.random.key(1), batch))
    with pytest.raises(ValueError, match="not both"):
        tasks.Conv_Cifar10_16_32x64x64(data_dir="/data", synthetic=True)


def test_cifar10_resize_is_the_2x2_mean():
    from lopt_fast.tasks.cifar10 import _to_16x16

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = images.astype(np.float64).reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4)) / 255.0
    np.testing.assert_allclose(_to_16x16(images), expected, rtol=1e-6)


def test_cifar10_missing_data_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    task = tasks.Conv_Cifar10_16_32x64x64(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        _ = task.datasets
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "tfds.data_source('cifar10', download=True)" in msg
    assert "TFDS_DATA_DIR" in msg and "data_dir" in msg
