"""Shared test inputs, and running repository scripts in a fresh process."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# For what compiles Triton modules to sm_90 without a GPU (triton bundles ptxas) or
# runs them in its interpreter: CI may have no triton (.ci/run lets its install fail).
needs_triton = pytest.mark.skipif(not HAVE_TRITON,
                                  reason="triton not installed (pip install 'lopt-fast[gpu]')")


def run_python(args, label, timeout=600, **env):
    """`python *args` from the repository root with `env` added; asserts it exits 0 and
    shows the end of its output if not. Returns its stdout."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{label}:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out.stdout


def host_devices_env(count: int, **extra) -> dict:
    """The environment of a subprocess with `count` CPU devices: the suite's XLA_FLAGS
    (conftest.py) with the device count added, and `extra`."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)


def random_theta(lopt, key):
    """A theta with random (not the init's zero) decays and biases so every input of the
    MLP matters."""
    theta = lopt.init(key)
    keys = iter(jax.random.split(jax.random.fold_in(key, 1), 16))
    theta["momentum_decays"] = 0.05 * jax.random.normal(next(keys), (3,))
    theta["rms_decays"] = 0.05 * jax.random.normal(next(keys), (1,))
    theta["adafactor_decays"] = 0.05 * jax.random.normal(next(keys), (3,))
    nn = theta["nn"]["~"]
    for k in list(nn):
        if k.startswith("b"):
            nn[k] = 0.1 * jax.random.normal(next(keys), nn[k].shape)
    return theta


def random_state(state, rng):
    """`state` with random accumulators in place of the zeros `opt.init` gives: momenta
    N(0, 1); rms, v_row, v_col and v_diag positive, log-uniform over [0.1, 10], each entry
    drawn on its own. From zeros, plane k of an accumulator holds (1 - b_k) times the same
    mean g^2 for the first steps, so the per-tensor normalisation makes the features of
    different decays almost equal, and a kernel that read one decay's plane for another's
    passed the tests (a Triton kernel reading the V side's feature 4 for feature 5 did)."""
    import jax.numpy as jnp

    def draw(tree, positive):
        def one(x):
            value = 10 ** rng.uniform(-1, 1, x.shape) if positive else rng.normal(size=x.shape)
            return jnp.asarray(value, x.dtype)
        return jax.tree.map(one, tree)

    return state.replace(mom=draw(state.mom, False), rms=draw(state.rms, True),
                         v_row=draw(state.v_row, True), v_col=draw(state.v_col, True),
                         v_diag=draw(state.v_diag, True))


def precise_reference(lopt, vmapped: bool = False):
    """`reference_update` (vmapped over tasks if asked), jitted and run on the CPU with
    float32 dots: the truth kernels are held to. On a GPU the reference itself would
    round differently (TF32 dots by default, other exp / rsqrt / reduction order), and
    that would enter every comparison. Inputs may live on any device; outputs are on
    the CPU."""
    import functools

    from lopt_fast.learned import reference_update

    fn = functools.partial(reference_update, lopt)
    fn = jax.jit(jax.vmap(fn) if vmapped else fn)
    cpu = jax.devices("cpu")[0]

    def reference(theta, state, grad):
        with jax.default_matmul_precision("highest"):
            return fn(*jax.device_put((theta, state, grad), cpu))

    return reference


def stored_after_a_move(ttgir: str, op: str) -> list[str]:
    """The values a Triton GPU module (TTGIR) stores that are a layout conversion of the
    result of an `op` (say "arith.subf"): computed in one layout, moved to the store's."""
    ops = dict(re.findall(r"(%\w+) = ([\w.]+)", ttgir))
    moved = dict(re.findall(r"(%\w+) = ttg\.convert_layout (%\w+)", ttgir))
    return [v for v in re.findall(r"tt\.store %\w+, (%\w+)", ttgir)
            if v in moved and ops.get(moved[v]) == op]
