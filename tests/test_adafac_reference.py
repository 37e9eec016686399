"""AdafacMLPLOpt reference path against an independent float64 NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.learned import adafac_math as am
from tests.helpers import random_theta
from tests.numpy_adafac import NumpyAdafac

SHAPES = [(), (7,), (13, 29), (3, 3, 5, 11), (4, 6, 5), (300, 130)]
NUM_STEPS = 6
REL_TOL = 2e-3
MIN_UPDATE = 1e-4  # cumulative reference update norm at or below this: draw again
MAX_DRAWS = 10


def run_both(shape, hidden_size, seed, exp_mult=0.3, step_mult=0.01):
    lopt = AdafacMLPLOpt(hidden_size=hidden_size, exp_mult=exp_mult, step_mult=step_mult)
    key = jax.random.key(seed)
    theta = random_theta(lopt, key)
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * (0.5 + i) for i in range(NUM_STEPS)]

    opt = lopt.opt_fn(theta, backend="reference")
    state = opt.init({"p": jnp.asarray(p0)}, num_steps=100)
    update = jax.jit(opt.update)
    ref = NumpyAdafac(jax.tree.map(np.asarray, theta), shape, exp_mult, step_mult)
    p_ref = p0.astype(np.float64)
    for g in grads:
        state = update(state, {"p": jnp.asarray(g)})
        p_ref = ref.step(p_ref, g)
    return p0, np.asarray(opt.get_params(state)["p"], np.float64), p_ref


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hidden_size", [4, 32])
def test_matches_float64_numpy(shape, hidden_size):
    # Fresh inputs every run. A random theta can make the MLP's output, and so every
    # step, tiny (0.4-0.7% of 3,000 scalar draws moved less than 1e-4 in six steps); the
    # relative error of such an update tests nothing, so draw again.
    rng = np.random.default_rng()
    for _ in range(MAX_DRAWS):
        seed = int(rng.integers(1 << 30))
        p0, p_jax, p_ref = run_both(shape, hidden_size, seed)
        delta_ref, delta_jax = p_ref - p0, p_jax - p0
        if np.linalg.norm(delta_ref) > MIN_UPDATE:
            break
    assert np.linalg.norm(delta_ref) > MIN_UPDATE, f"{MAX_DRAWS} draws all moved <= {MIN_UPDATE}"
    rel = np.linalg.norm(delta_jax - delta_ref) / np.linalg.norm(delta_ref)
    worst = np.unravel_index(np.argmax(np.abs(delta_jax - delta_ref)), np.shape(delta_ref))
    assert rel <= REL_TOL, f"{shape=} {hidden_size=} {seed=} {rel=:.2e} worst index {worst}"


def test_chunked_pass_equals_single_chunk():
    """Pass 2's chunk loop (the last chunk clamped, overlapping its neighbour)
    gives what one whole-tensor chunk gives."""
    lopt = AdafacMLPLOpt(hidden_size=8, exp_mult=0.3, step_mult=0.01)
    key = jax.random.key(3)
    theta = random_theta(lopt, key)
    nn = theta["nn"]["~"]
    decays = am.decays_from_theta(theta, lopt.initial_decays)
    for shape in [(37, 53), (53, 37), (5, 7, 41), (3, 3, 17, 19), (1000,)]:
        p = jax.random.normal(jax.random.fold_in(key, 1), shape)
        g = jax.random.normal(jax.random.fold_in(key, 2), shape)
        acc = am.update_accumulators(am.init_leaf(shape), g, decays)
        moments = am.feature_second_moments(p, g, acc)
        w0, b0 = am.first_layer(nn, moments, 3)
        whole = am.apply_step(p, g, acc, w0, b0, nn, 0.3, 0.01, chunk_elements=10**9)
        plan = am._chunk_plan(shape, 200)
        assert plan is not None and plan[2] >= 3, f"{shape=} should be chunked"
        # The leading axis while one of its indices holds <= 4 chunks, else the largest.
        assert plan[0] == (3 if shape == (3, 3, 17, 19) else 0), f"{shape=} {plan=}"
        chunked = am.apply_step(p, g, acc, w0, b0, nn, 0.3, 0.01, chunk_elements=200)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7, err_msg=f"{shape=}")


def test_factored_dims_ties_match_learned_optimization():
    # learned_optimization: argsort of the shape, d1 second-largest, d0 largest.
    assert am.factored_dims((3, 3, 64, 64)) == (2, 3)
    assert am.factored_dims((10, 10)) == (0, 1)
    assert am.factored_dims((1024, 10)) == (1, 0)
    assert am.factored_dims((5,)) is None
    assert am.factored_dims(()) is None
