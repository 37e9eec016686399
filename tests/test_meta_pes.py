"""PES / ES / truncated backprop checked by their numbers on a quadratic meta-problem.

The inner problem is SGD with a learned learning rate on a deterministic quadratic,
so the true meta-gradient of each truncation's mean loss is `jax.grad` of the
whole unroll. Estimates are drawn many times (vmapped over keys, one task each) and
their mean is compared with the truth within a bound computed from the sample std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast.meta import (
    ConstantTruncationSchedule,
    TruncatedES,
    TruncatedGrad,
    TruncatedPES,
    UnrollOut,
    VectorizedLOptTruncatedStep,
    compute_pes_grad,
    sample_perturbations,
)
from tests.test_meta_toys import LearnedLR, Quadratic, quadratic_losses

HORIZON, TRUNC, NUM_TRUNCS = 16, 4, 3  # runs end in truncation 4: see pes.py
DRAWS = 4000
Z = 5.0  # bound: |mean - truth| <= Z * std / sqrt(draws) + smoothing slack


def _estimator(cls, trunc=TRUNC, horizon=HORIZON, num_tasks=1):
    step = VectorizedLOptTruncatedStep(Quadratic(), LearnedLR(),
                                       ConstantTruncationSchedule(horizon), num_tasks)
    return cls(step, trunc_length=trunc)


def _true_grads(theta, trunc=TRUNC, num_truncs=NUM_TRUNCS):
    def trunc_loss(log_lr, k):
        losses = quadratic_losses(Quadratic(), log_lr, trunc * num_truncs)
        return jnp.mean(losses[k * trunc:(k + 1) * trunc])

    return np.array([jax.grad(trunc_loss)(theta["log_lr"], k) for k in range(num_truncs)])


def _draw_estimates(est, theta, key, num_truncs=NUM_TRUNCS, draws=DRAWS):
    """[draws, num_truncs] estimates of d loss_k / d log_lr, each draw its own keys."""

    def one(key):
        state = est.init_worker_state(theta, jax.random.key(0))
        grads = []
        for k in range(num_truncs):
            out = est.compute_gradient_estimate(theta, state, jax.random.fold_in(key, k), None)
            state = out.state
            grads.append(out.grad["log_lr"])
        return jnp.stack(grads)

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, draws)), np.float64)


def _assert_mean_matches(samples, truth, what):
    mean, std = samples.mean(0), samples.std(0, ddof=1)
    bound = Z * std / np.sqrt(len(samples)) + 1e-3 * np.abs(truth)
    err = np.abs(mean - truth)
    assert np.all(err <= bound), f"{what}: {mean=} {truth=} {err=} {bound=}"
    return mean, bound


def test_pes_mean_matches_true_meta_gradient():
    est = _estimator(TruncatedPES)
    theta = LearnedLR().init(None)
    samples = _draw_estimates(est, theta, jax.random.key(1))
    truth = _true_grads(theta)
    _, bound = _assert_mean_matches(samples, truth, "PES")
    assert np.all(bound < 0.25 * np.abs(truth)), f"test has no power: {bound=} {truth=}"


def test_es_is_biased_where_pes_is_not():
    """Truncated ES ignores theta's effect on the starting state of truncation 3."""
    theta = LearnedLR().init(None)
    truth = _true_grads(theta)
    es = _draw_estimates(_estimator(TruncatedES), theta, jax.random.key(2))
    mean, std = es.mean(0)[-1], es.std(0, ddof=1)[-1]
    assert abs(mean - truth[-1]) > 3 * Z * std / np.sqrt(DRAWS), f"{mean=} {truth[-1]=}"


def test_pes_and_es_agree_in_expectation_on_a_short_horizon():
    """When the truncation is the whole run, PES and ES estimate the same gradient."""
    theta = LearnedLR().init(None)
    truth = _true_grads(theta, trunc=HORIZON, num_truncs=1)
    pes = _draw_estimates(_estimator(TruncatedPES, trunc=HORIZON), theta, jax.random.key(3),
                          num_truncs=1)
    es = _draw_estimates(_estimator(TruncatedES, trunc=HORIZON), theta, jax.random.key(4),
                         num_truncs=1)
    _assert_mean_matches(pes, truth, "PES short horizon")
    _assert_mean_matches(es, truth, "ES short horizon")
    diff = abs(pes.mean() - es.mean())
    bound = Z * np.sqrt(pes.var(ddof=1) / len(pes) + es.var(ddof=1) / len(es))
    assert diff <= bound, f"{pes.mean()=} {es.mean()=} {bound=}"


def test_truncated_grad_is_exact_on_the_first_truncation():
    est = _estimator(TruncatedGrad)
    theta = LearnedLR().init(None)
    state = est.init_worker_state(theta, jax.random.key(0))
    out = est.compute_gradient_estimate(theta, state, jax.random.key(1), None)
    np.testing.assert_allclose(out.grad["log_lr"], _true_grads(theta)[0], rtol=1e-5)


# -- the accumulator ------------------------------------------------------------------


def _reference_pes(p_loss, n_loss, mask, done, acc, eps, std):
    """learned_optimization's per-step selection, written as loops over numpy arrays."""
    T, n = p_loss.shape
    grads, new_acc = [], []
    for i in range(n):
        pos = (p_loss[:, i] * mask[:, i]).sum() / mask[:, i].sum()
        neg = (n_loss[:, i] * mask[:, i]).sum() / mask[:, i].sum()
        c = (pos - neg) / (2 * std**2)
        finished, per_step = False, []
        for t in range(T):
            finished = finished or bool(done[t, i])
            per_step.append(c * (eps[i] if finished else acc[i] + eps[i]))
        grads.append(np.mean(per_step, axis=0))
        new_acc.append(eps[i] if finished else acc[i] + eps[i])
    return np.mean(grads, axis=0), np.stack(new_acc)


def test_compute_pes_grad_matches_reference_with_resets():
    rng = np.random.default_rng(0)
    T, n, std = 5, 4, 0.01
    p_loss, n_loss = rng.normal(size=(2, T, n)).astype(np.float32)
    done = np.zeros((T, n), bool)
    done[1, 1] = True  # task 1 ends mid-truncation, task 2 on the last step
    done[4, 2] = True  # task 0 and 3 never
    mask = np.ones((T, n), bool)
    mask[2, 1] = False  # the reset step after task 1's end
    acc = rng.normal(size=(n, 3)).astype(np.float32)
    eps = (std * rng.normal(size=(n, 3))).astype(np.float32)
    ys = lambda loss: UnrollOut(loss=jnp.asarray(loss), mask=jnp.asarray(mask),  # noqa: E731
                                is_done=jnp.asarray(done), iteration=jnp.zeros((T, n), jnp.int32))
    _, grad, new_acc, _ = compute_pes_grad(ys(p_loss), ys(n_loss), {"w": jnp.asarray(acc)},
                                           {"w": jnp.asarray(eps)}, std)
    ref_grad, ref_acc = _reference_pes(p_loss, n_loss, mask, done, acc, eps, std)
    np.testing.assert_allclose(grad["w"], ref_grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_acc["w"], ref_acc, rtol=1e-6, atol=1e-7)
    # Tasks that ended keep only this truncation's perturbation.
    new_acc = np.asarray(new_acc["w"])
    np.testing.assert_allclose(new_acc[[1, 2]], eps[[1, 2]])
    np.testing.assert_allclose(new_acc[[0, 3]], acc[[0, 3]] + eps[[0, 3]], rtol=1e-6)


@pytest.mark.parametrize("offset", [0, 5])
def test_accumulator_sums_perturbations_since_the_last_reset(offset):
    """Runs of 6 steps, truncations of 4: accumulator = sum of eps since the run began."""
    horizon, trunc, n = 6, 4, 3
    step = VectorizedLOptTruncatedStep(Quadratic(), LearnedLR(),
                                       ConstantTruncationSchedule(horizon), n,
                                       random_initial_iteration_offset=offset)
    est = TruncatedPES(step, trunc_length=trunc)
    theta = LearnedLR().init(None)
    state = est.init_worker_state(theta, jax.random.key(7))
    inner_step = np.array(state.unroll_state.inner_step[::2])
    expected = np.zeros(n)
    for k in range(5):
        key = jax.random.key(100 + k)
        eps = np.asarray(sample_perturbations(theta, jax.random.split(key)[0], est.std,
                                              n)["log_lr"])
        out = est.compute_gradient_estimate(theta, state, key, None)
        state = out.state
        for i in range(n):  # simulate: reset when the run reaches `horizon` in this truncation
            s, ended = inner_step[i], False
            for _ in range(trunc):
                if s == -1:  # reset step
                    s = 0
                    continue
                s += 1
                if s >= horizon:
                    ended, s = True, -1
            inner_step[i] = s
            expected[i] = eps[i] if ended else expected[i] + eps[i]
        np.testing.assert_allclose(np.asarray(state.accumulator["log_lr"]), expected,
                                   rtol=1e-5, atol=1e-8, err_msg=f"truncation {k}")
