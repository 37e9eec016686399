"""AdafacMLPLOpt: theta structure, API, optax bridge, weights I/O and edge cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lopt_fast.learned import AdafacMLPLOpt, as_optax, load_theta, save_theta
from lopt_fast.optimizers import SGD, SGDM, Adam, AdamW
from tests.helpers import random_theta

H = 32


@pytest.fixture(scope="module")
def lopt():
    return AdafacMLPLOpt(hidden_size=H)


@pytest.fixture(scope="module")
def theta(lopt):
    return lopt.init(jax.random.key(0))


def random_tree(key, tree_shapes):
    leaves, treedef = jax.tree.flatten(tree_shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves, strict=True)])


# ---------------------------------------------------------------- structure


def test_theta_structure_matches_learned_optimization(theta):
    shapes = jax.tree.map(jnp.shape, theta)
    assert shapes == {
        "momentum_decays": (3,), "rms_decays": (1,), "adafactor_decays": (3,),
        "nn": {"~": {"w0": (39, H), "b0": (H,), "w1": (H, H), "b1": (H,),
                     "w2": (H, 2), "b2": (2,)}},
    }
    # The tutorial's count for hidden_size=32 would be 39*32+32+32*32+32+32*2+2+7.
    assert sum(x.size for x in jax.tree.leaves(theta)) == 39 * 32 + 32 + 32 * 32 + 32 + 66 + 7


def test_default_constructor_matches_learned_optimization():
    lopt = AdafacMLPLOpt()
    assert (lopt.hidden_size, lopt.hidden_layers, lopt.exp_mult, lopt.step_mult) == (4, 2, 1e-3, 1e-3)
    assert lopt.initial_decays.mom == (0.9, 0.99, 0.999)
    assert lopt.initial_decays.rms == (0.999,)
    assert lopt.initial_decays.fac == (0.9, 0.99, 0.999)
    assert jax.tree.map(jnp.shape, lopt.init(jax.random.key(1)))["nn"]["~"]["w1"] == (4, 4)


def test_init_statistics():
    """Truncated normal (at 2 std) with std 1/sqrt(fan_in); zero biases and decays."""
    lopt = AdafacMLPLOpt(hidden_size=256)
    theta = lopt.init(jax.random.key(2))
    nn = theta["nn"]["~"]
    for name, fan_in in [("w0", 39), ("w1", 256), ("w2", 256)]:
        w = np.asarray(nn[name])
        stddev = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= 2 * stddev + 1e-7, name
        # std of a standard normal truncated to [-2, 2] is 0.8796.
        np.testing.assert_allclose(w.std(), 0.8796 * stddev, rtol=0.08, err_msg=name)
        assert abs(w.mean()) < 0.1 * stddev, name
    for name in ["b0", "b1", "b2"]:
        assert not np.any(nn[name])
    for name in ["momentum_decays", "rms_decays", "adafactor_decays"]:
        assert not np.any(theta[name])
    # Different keys give different weights.
    other = lopt.init(jax.random.key(3))["nn"]["~"]["w0"]
    assert not np.allclose(other, nn["w0"])


def test_theta_of_wrong_shape_is_rejected(lopt, theta):
    bad = jax.tree.map(lambda x: x, theta)
    bad["nn"]["~"]["w0"] = jnp.zeros((40, H))
    with pytest.raises(ValueError, match="theta does not fit"):
        lopt.opt_fn(bad)


# ---------------------------------------------------------------- API / trees


def test_tutorial_api(lopt, theta):
    opt = lopt.opt_fn(theta)
    params = jnp.ones([3])
    state = opt.init(params, num_steps=10)
    state = opt.update(state, loss=1.0, grad=jnp.ones([3]))
    new = opt.get_params(state)
    assert new.shape == (3,) and np.all(np.isfinite(new)) and not np.allclose(new, params)
    assert int(state.iteration) == 1 and int(state.num_steps) == 10


@pytest.mark.parametrize("make_tree", [
    lambda k: {"a": jax.random.normal(k, (4, 5)), "b": [jax.random.normal(k, (3,)),
                                                         jax.random.normal(k, ())]},
    lambda k: [jax.random.normal(k, (2, 3, 4)), (jax.random.normal(k, (3, 3, 2, 6)),)],
    lambda k: {},
], ids=["dict_list_scalar", "list_tuple_nd", "empty"])
def test_any_pytree(lopt, theta, make_tree):
    params = make_tree(jax.random.key(4))
    grad = jax.tree.map(lambda x: jnp.cos(x) + 0.1, params)
    opt = lopt.opt_fn(theta)
    state = opt.init(params, num_steps=5)
    state = jax.jit(opt.update)(state, grad)
    new = opt.get_params(state)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for p, n in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        assert n.shape == p.shape and n.dtype == p.dtype
        assert not np.allclose(n, p)
    assert int(state.iteration) == 1


def test_flax_nnx_state(lopt, theta):
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    kernel_before = np.array(model.kernel[...])
    grads = jax.tree.map(jnp.ones_like, params)
    opt = lopt.opt_fn(theta)
    state = opt.update(opt.init(params, num_steps=3), grads)
    new = opt.get_params(state)
    nnx.update(model, new)
    assert not np.allclose(model.kernel[...], kernel_before)


def test_state_is_float32_and_params_keep_bf16(lopt, theta):
    params = {"w": jax.random.normal(jax.random.key(5), (6, 7)).astype(jnp.bfloat16),
              "b": jnp.ones((7,), jnp.bfloat16)}
    grad = jax.tree.map(lambda x: (x * 0.5 + 0.1).astype(jnp.bfloat16), params)
    opt = lopt.opt_fn(theta)
    state = opt.init(params, num_steps=4)
    for _ in range(3):
        state = jax.jit(opt.update)(state, grad)
    for tree in (state.mom, state.rms, state.v_row, state.v_col, state.v_diag):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
    new = opt.get_params(state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
    # The bf16 result is the float32 path's result, rounded.
    f32 = lopt.opt_fn(theta)
    s32 = f32.init(jax.tree.map(lambda x: x.astype(jnp.float32), params), num_steps=4)
    g32 = jax.tree.map(lambda x: x.astype(jnp.float32), grad)
    s32 = f32.update(s32, g32)
    s16 = opt.update(opt.init(params, num_steps=4), grad)
    for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(s32.params), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2, rtol=1e-2)


def test_update_is_jittable_and_vmappable_over_theta(lopt):
    """Meta-training vmaps the update over tasks, each with its own theta."""
    thetas = jax.vmap(lopt.init)(jax.random.split(jax.random.key(6), 3))
    params = jax.random.normal(jax.random.key(7), (3, 40, 50))
    grads = jax.random.normal(jax.random.key(8), (3, 40, 50))

    def one(theta, p, g):
        opt = lopt.opt_fn(theta)
        return opt.get_params(opt.update(opt.init(p, num_steps=10), g))

    batched = jax.jit(jax.vmap(one))(thetas, params, grads)
    for i in range(3):
        single = one(jax.tree.map(lambda x, i=i: x[i], thetas), params[i], grads[i])
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input


def test_missing_num_steps(lopt, theta):
    with pytest.raises(ValueError, match="num_steps"):
        lopt.opt_fn(theta).init(jnp.ones(3))


def test_mismatched_grad_tree(lopt, theta):
    opt = lopt.opt_fn(theta)
    state = opt.init({"a": jnp.ones(3), "b": jnp.ones(2)}, num_steps=3)
    with pytest.raises(ValueError, match="does not match the params tree"):
        opt.update(state, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(3,\), expected \(2,\)"):
        opt.update(state, {"a": jnp.ones(3), "b": jnp.ones(3)})


def test_init_gives_float32_theta_under_x64(lopt):
    """learned_optimization's dtype, whatever JAX's default float is."""
    with jax.enable_x64(True):
        theta = lopt.init(jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(theta)} == {jnp.dtype(jnp.float32)}


def test_integer_params_rejected(lopt, theta):
    with pytest.raises(TypeError, match="only floating-point"):
        lopt.opt_fn(theta).init({"step": jnp.asarray(3)}, num_steps=3)


@pytest.mark.parametrize(("bad", "backend", "x64"), [
    (np.nan, "reference", False), (np.inf, "reference", False), (-np.inf, "reference", False),
    (np.nan, "pallas", False), (np.nan, "reference", True), (np.nan, "pallas", True)])
def test_nonfinite_gradient_skips_the_step(lopt, bad, backend, x64):
    """With jax_enable_x64 the params are float64 ("w", "b"): kept bitwise too, which a
    step computed as float32 p - 0 would not (it rounds them)."""
    with jax.enable_x64(x64):
        assert jnp.ones(()).dtype == (jnp.float64 if x64 else jnp.float32)
        _check_nonfinite_gradient_skips_the_step(lopt, bad, backend)


def _check_nonfinite_gradient_skips_the_step(lopt, bad, backend):
    # theta as numpy arrays, as load_theta returns it.
    opt = lopt.opt_fn(jax.tree.map(np.asarray, random_theta(lopt, jax.random.key(8))), backend=backend)
    params = {"w": jax.random.normal(jax.random.key(9), (5, 6)), "b": jnp.ones(6),
              "h": jax.random.normal(jax.random.key(10), (7,)).astype(jnp.bfloat16)}
    good = jax.tree.map(lambda x: jnp.sin(x) + 0.2, params)
    update = jax.jit(opt.update)
    state = update(opt.init(params, num_steps=10), good)
    bad_grad = {**good, "w": good["w"].at[2, 3].set(bad)}
    after = update(state, bad_grad)
    assert int(after.nonfinite_steps) == 1
    assert int(after.iteration) == int(state.iteration)
    # Every parameter and accumulator keeps its exact value (bitwise, bf16 included).
    unchanged = lambda s: jax.tree.leaves(s.replace(iteration=None, nonfinite_steps=None))  # noqa: E731
    for a, b in zip(unchanged(after), unchanged(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # A skipped first step too: float64 params straight from their init, most of them not
    # float32 values (after a step of the old float32 p - step, all would be).
    first = update(opt.init(params, num_steps=10), bad_grad)
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training continues normally on the next finite gradient, as if the bad step never came.
    resumed = update(after, good)
    assert int(resumed.iteration) == 2 and int(resumed.nonfinite_steps) == 1
    direct = update(state, good)
    for a, b in zip(unchanged(resumed), unchanged(direct), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- optax bridge


def test_optax_bridge_equals_direct_api(lopt, theta):
    params = random_tree(jax.random.key(10), {"w": (8, 9), "b": (9,), "s": ()})
    opt = lopt.opt_fn(theta)
    state = opt.init(params, num_steps=20)
    tx = lopt.as_optax(theta, num_steps=20)
    tx_state = tx.init(params)
    p_optax = params
    for i in range(4):
        grad = random_tree(jax.random.key(20 + i), {"w": (8, 9), "b": (9,), "s": ()})
        state = opt.update(state, grad, loss=1.0)
        updates, tx_state = tx.update(grad, tx_state, p_optax, loss=1.0)
        p_optax = optax.apply_updates(p_optax, updates)
    for a, b in zip(jax.tree.leaves(p_optax), jax.tree.leaves(opt.get_params(state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_donated_state_and_optax_state(lopt, theta, backend):
    """Training loops donate the optimizer state to jit; every state leaf must be its
    own buffer (unused [3, 0] slots included), and donation must not change results."""
    shapes = {"w": (8, 9), "b": (9,), "s": ()}
    params = random_tree(jax.random.key(11), shapes)
    grads = [random_tree(jax.random.key(30 + i), shapes) for i in range(3)]
    opt = lopt.opt_fn(theta, backend=backend)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (donation deletes buffers)
    kept, donated = opt.init(copy(params), num_steps=9), opt.init(copy(params), num_steps=9)
    update, update_donated = jax.jit(opt.update), jax.jit(opt.update, donate_argnums=0)
    tx = lopt.as_optax(theta, num_steps=9, backend=backend)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def optax_step(p, tx_state, g):
        updates, tx_state = tx.update(g, tx_state, p, loss=1.0)
        return optax.apply_updates(p, updates), tx_state

    p_optax, tx_state = copy(params), tx.init(params)
    for g in grads:
        kept, donated = update(kept, g), update_donated(donated, g)
        p_optax, tx_state = optax_step(p_optax, tx_state, g)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(donated), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(p_optax), jax.tree.leaves(kept.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_optax_bridge_requires_num_steps_and_params(lopt, theta):
    with pytest.raises(TypeError):
        lopt.as_optax(theta)  # num_steps is required
    tx = as_optax(lopt.opt_fn(theta), num_steps=3)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_flax_training_loop_with_optax_bridge(lopt):
    """The README example: nnx.Optimizer drives the learned optimizer, loss decreases."""
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(12), (64, 4))
    y = x @ jnp.asarray([[1.0], [-2.0], [0.5], [3.0]])
    tx = lopt.as_optax(trained_like_theta(lopt), num_steps=50)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(50)]
    assert losses[-1] < 0.5 * losses[0], losses


def trained_like_theta(lopt):
    """A hand-set theta that behaves like sign-SGD on the gradient feature (feature 0):
    direction = relu(g_hat) - relu(-g_hat), so training makes progress."""
    theta = lopt.init(jax.random.key(13))
    nn = {k: jnp.zeros_like(v) for k, v in theta["nn"]["~"].items()}
    nn["w0"] = nn["w0"].at[0, 0].set(1.0).at[0, 1].set(-1.0)
    nn["w1"] = nn["w1"].at[0, 0].set(1.0).at[1, 1].set(1.0)
    nn["w2"] = nn["w2"].at[0, 0].set(50.0).at[1, 0].set(-50.0)
    theta["nn"]["~"] = nn
    return theta


# ---------------------------------------------------------------- weights I/O


def test_save_load_theta_round_trip(tmp_path, lopt, theta):
    path = tmp_path / "sub" / "theta.npz"
    save_theta(path, theta)
    loaded = load_theta(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(theta)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(theta), strict=True):
        np.testing.assert_array_equal(a, b)
    lopt.opt_fn(loaded)  # usable as is
    assert list(path.parent.iterdir()) == [path]  # no temporary files left


def test_load_theta_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no theta file"):
        load_theta(tmp_path / "nope.npz")


# ---------------------------------------------------------------- baselines


@pytest.mark.parametrize("ours,tx", [
    (SGD(0.1), optax.sgd(0.1)),
    (SGDM(0.05, 0.8), optax.sgd(0.05, momentum=0.8)),
    (Adam(3e-3), optax.adam(3e-3)),
    (AdamW(3e-3, weight_decay=0.1), optax.adamw(3e-3, weight_decay=0.1)),
], ids=["sgd", "sgdm", "adam", "adamw"])
def test_baselines_equal_optax(ours, tx):
    params = random_tree(jax.random.key(14), {"w": (5, 3), "b": (3,)})
    state = ours.init(params)
    tx_state = tx.init(params)
    p = params
    for i in range(5):
        grad = random_tree(jax.random.key(30 + i), {"w": (5, 3), "b": (3,)})
        state = ours.update(state, grad, loss=0.0)
        updates, tx_state = tx.update(grad, tx_state, p)
        p = optax.apply_updates(p, updates)
    for a, b in zip(jax.tree.leaves(ours.get_params(state)), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
