"""The reference update under vmap over tasks: groups of tasks in turn for big tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.learned import adafac_math as am
from lopt_fast.learned import task_batching as tb
from tests.helpers import random_theta


@pytest.mark.parametrize(("axis_size", "elements", "budget", "group"), [
    (8, 100, 2000, 8),      # the whole batch fits: plain vmap
    (8, 600, 2000, 2),      # 3 tasks would fit, the largest divisor of 8 that does is 2
    (6, 600, 2000, 3),
    (8, 5000, 2000, 1),     # one task is more than the budget: one task at a time
    (7, 300, 2000, 1),      # 7 is prime and 7 tasks do not fit
])
def test_group_size(axis_size, elements, budget, group):
    assert tb._group_size(axis_size, elements, budget) == group


def _per_task_trees(tasks, shapes, key):
    leaves = []
    for i, shape in enumerate(shapes):
        leaves.append(jax.random.normal(jax.random.fold_in(key, i), (tasks,) + shape))
    return {f"t{i}": x for i, x in enumerate(leaves)}


def test_grouped_vmap_equals_each_task_alone_and_plain_vmap():
    """4 tasks, each with its own theta, on tensors that take each path: plain vmap
    (small), groups of 2, and one task at a time (chunked within the task)."""
    tasks = 4
    shapes = [(9,), (220, 100), (520, 130)]  # 4 tasks at once, groups of 2, one at a time
    assert [tb._group_size(tasks, int(np.prod(s)), tb.GROUP_ELEMENTS) for s in shapes] == [4, 2, 1]
    lopt = AdafacMLPLOpt(hidden_size=8, exp_mult=0.3, step_mult=0.01)
    key = jax.random.key(int(np.random.default_rng().integers(1 << 30)))
    thetas = jax.vmap(lambda k: random_theta(lopt, k))(jax.random.split(key, tasks))
    params = _per_task_trees(tasks, shapes, jax.random.fold_in(key, 1))
    grads = [_per_task_trees(tasks, shapes, jax.random.fold_in(key, 2 + s)) for s in range(3)]

    def run(update_fn):
        states = jax.vmap(lambda p: lopt.opt_fn(lopt.init(key)).init(p, num_steps=10))(params)
        for g in grads:
            states = update_fn(states, g)
        return states

    def one_task(th, s, g):
        return lopt.opt_fn(th, backend="reference").update(s, g)

    def each_alone(states, grad):
        task = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
        outs = [jax.jit(one_task)(task(thetas, i), task(states, i), task(grad, i)) for i in range(tasks)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    grouped = run(jax.jit(lambda s, g: jax.vmap(one_task)(thetas, s, g)))
    alone = run(each_alone)
    for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_derivatives_through_the_grouped_vmap_equal_plain_vmap():
    """custom_vmap has no autodiff of its own: the custom_jvp differentiates the plain
    update, so reverse- and forward-mode derivatives are unchanged."""
    tasks, shape = 3, (300, 230)  # 69000 entries: one task at a time
    assert tb._group_size(tasks, 300 * 230, tb.GROUP_ELEMENTS) == 1
    lopt = AdafacMLPLOpt(hidden_size=4, exp_mult=0.3, step_mult=0.01)
    key = jax.random.key(5)
    theta = random_theta(lopt, key)
    decays = am.decays_from_theta(theta, lopt.initial_decays)
    nn = theta["nn"]["~"]
    p = jax.random.normal(jax.random.fold_in(key, 1), (tasks,) + shape)
    g = jax.random.normal(jax.random.fold_in(key, 2), (tasks,) + shape)
    acc = jax.vmap(lambda x: am.update_accumulators(am.init_leaf(shape), x, decays))(g)

    def loss(leaf_update, nn, p):
        new_p, new_acc = jax.vmap(lambda p, g, acc: leaf_update(p, g, acc, nn, decays, 3, 0.3, 0.01))(
            p, g, acc)
        return jnp.sum(jnp.sin(new_p)) + jnp.sum(new_acc.mom ** 2)

    got = jax.jit(jax.grad(lambda nn, p: loss(tb.leaf_update, nn, p), argnums=(0, 1)))(nn, p)
    want = jax.jit(jax.grad(lambda nn, p: loss(am.leaf_update, nn, p), argnums=(0, 1)))(nn, p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    tangents = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, 3), x.shape), (nn, p))
    got = jax.jit(lambda: jax.jvp(lambda nn, p: loss(tb.leaf_update, nn, p), (nn, p), tangents))()
    want = jax.jit(lambda: jax.jvp(lambda nn, p: loss(am.leaf_update, nn, p), (nn, p), tangents))()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
