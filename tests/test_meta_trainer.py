"""Outer trainer, checkpoints / resume and multi-device sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_fast.learned import load_theta, save_theta
from lopt_fast.meta import (
    ConfigMismatchError,
    ConstantTruncationSchedule,
    LogUniformLengthSchedule,
    OuterTrainer,
    TruncatedGrad,
    TruncatedPES,
    VectorizedLOptTruncatedStep,
    load_checkpoint,
    meta_train,
    save_checkpoint,
)
from tests.helpers import host_devices_env
from tests.test_meta_toys import LearnedLR, Regression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(num_tasks=4, estimators=("pes",), meta_loss_split=None, mesh=None):
    step = VectorizedLOptTruncatedStep(Regression(), LearnedLR(), ConstantTruncationSchedule(12),
                                       num_tasks, random_initial_iteration_offset=12,
                                       meta_loss_split=meta_loss_split)
    make = {"pes": lambda: TruncatedPES(step, trunc_length=5),
            "tbptt": lambda: TruncatedGrad(step, trunc_length=5)}
    return OuterTrainer([make[e]() for e in estimators],
                        optax.chain(optax.clip(3.0), optax.adam(3e-2)), mesh=mesh)


def _leaves_equal(a, b):
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def test_truncated_step_passes_the_optimizer_options():
    """backend, mlp_precision and kernel_options reach `opt_fn` (the last two only when
    given, so learned optimizers without them still work)."""
    seen = []

    class Recording(LearnedLR):
        def opt_fn(self, theta, is_training=False, **options):
            seen.append(options)
            return super().opt_fn(theta, is_training)

    layer1 = {"layer1": "dot_all"}
    for precision, kernel_options, want in (
            (None, None, {"backend": "reference"}),
            ("bf16", layer1, {"backend": "reference", "mlp_precision": "bf16",
                              "kernel_options": layer1})):
        seen.clear()
        step = VectorizedLOptTruncatedStep(Regression(), Recording(), ConstantTruncationSchedule(6),
                                           2, backend="reference", mlp_precision=precision,
                                           kernel_options=kernel_options)
        theta = step.learned_opt.init(None)
        state = step.init_step_state(theta, jax.random.key(0))
        step.unroll(theta, state, jax.random.key(1), 2, step.get_data(2))
        assert seen and all(options == want for options in seen), seen


def test_truncation_schedules():
    const = ConstantTruncationSchedule(5)
    s = const.init(jax.random.key(0))
    assert [bool(const.next_state(s, jnp.asarray(i), None)[1]) for i in (4, 5)] == [False, True]
    logu = LogUniformLengthSchedule(2, 50)
    lengths = np.array([int(logu.init(k).length) for k in jax.random.split(jax.random.key(0), 400)])
    assert lengths.min() >= 2 and lengths.max() < 50
    assert np.median(lengths) < 15, "log-uniform: most runs are short"
    s = logu.init(jax.random.key(1))
    s2, done = logu.next_state(s, s.length, jax.random.key(2))
    assert bool(done)
    s3, done = logu.next_state(s, s.length - 1, jax.random.key(2))
    assert not bool(done) and int(s3.length) == int(s.length)


def test_unroll_offsets_resets_and_meta_loss_split():
    step = VectorizedLOptTruncatedStep(Regression(), LearnedLR(), ConstantTruncationSchedule(6),
                                       3, random_initial_iteration_offset=6,
                                       meta_loss_split="outer_valid")
    theta = LearnedLR().init(None)
    state = step.init_step_state(theta, jax.random.key(0))
    start = np.asarray(state.inner_step)
    assert start.min() >= 0 and start.max() < 6 and len(set(start.tolist())) > 1
    state, ys = jax.jit(step.unroll, static_argnums=3)(theta, state, jax.random.key(1), 8,
                                                       step.get_data(8))
    assert ys.loss.shape == (8, 3)
    # Every task reaches step 6 (done), is reset on the next step (masked), restarts at 1.
    for i in range(3):
        it = np.asarray(ys.iteration[:, i])
        done_at = int(np.argmax(np.asarray(ys.is_done[:, i])))
        assert it[done_at] == 6 and it[done_at + 1] == 0 and not bool(ys.mask[done_at + 1, i])
        assert float(ys.loss[done_at + 1, i]) == 0.0
    assert np.all(np.isfinite(np.asarray(ys.loss)))


@pytest.mark.parametrize("estimators", [("pes",), ("pes", "tbptt")])
def test_outer_trainer_reduces_meta_loss(estimators):
    trainer = _trainer(estimators=estimators)
    state = trainer.init(jax.random.key(0))
    lr0 = float(jnp.exp(state.theta["log_lr"]))
    for _ in range(30):
        state, metrics = trainer.update(state)
    assert set(metrics) >= {"loss", "grad_norm"}
    assert float(jnp.exp(state.theta["log_lr"])) > lr0, "learned lr should grow from 0.1"
    assert int(state.step) == 30


def test_resumed_run_equals_uninterrupted(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint.npz"
    config = {"task": "toy", "seed": 0}
    full = meta_train(_trainer(), jax.random.key(0), 7, progress=False)
    first = meta_train(_trainer(), jax.random.key(0), 4, ckpt_path=ckpt, ckpt_every=3,
                       config=config, progress=False)
    assert first.resumed_from == 0 and ckpt.exists()
    # A kill after step 4 loses nothing here (saved at 3 and at the end, 4).
    resumed = meta_train(_trainer(), jax.random.key(123), 7, ckpt_path=ckpt, ckpt_every=3,
                         config=config, progress=False)
    assert resumed.resumed_from == 4
    _leaves_equal(full.state, resumed.state)
    assert [h["loss"] for h in full.history[4:]] == [h["loss"] for h in resumed.history]
    with pytest.raises(ConfigMismatchError, match="seed"):
        meta_train(_trainer(), jax.random.key(0), 8, ckpt_path=ckpt, config={**config, "seed": 1},
                   progress=False)


def test_checkpoint_is_atomic_and_checked(tmp_path, monkeypatch):
    trainer = _trainer()
    state = trainer.init(jax.random.key(0))
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, state, {"a": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, state)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.npz"]
    _leaves_equal(state, load_checkpoint(path, state))
    other = _trainer(num_tasks=8).init(jax.random.key(0))
    with pytest.raises(ValueError, match="expected"):
        load_checkpoint(path, other)
    save_theta(tmp_path / "theta.npz", state.theta)
    _leaves_equal(state.theta, load_theta(tmp_path / "theta.npz"))


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from lopt_fast.meta import task_mesh
    from tests.test_meta_trainer import _trainer
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, mesh in [("single", None), ("sharded", task_mesh())]:
        trainer = _trainer(num_tasks=8, estimators=("pes", "tbptt"),
                           meta_loss_split="outer_valid", mesh=mesh)
        state = trainer.init(jax.random.key(0))
        losses = []
        for _ in range(4):
            state, m = trainer.update(state)
            losses.append(float(m["loss"]))
        acc = state.worker_states[0].accumulator["log_lr"]
        out[name] = {"theta": float(state.theta["log_lr"]), "losses": losses,
                     "acc": np.asarray(acc).tolist(),
                     "acc_devices": len(acc.sharding.device_set),
                     "acc_shard": list(acc.addressable_shards[0].data.shape)}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_equals_single_device():
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO,
                          env=host_devices_env(8, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    single, sharded = res["single"], res["sharded"]
    assert sharded["acc_devices"] == 8 and sharded["acc_shard"] == [1]
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["acc"], single["acc"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sharded["theta"], single["theta"], rtol=1e-5, atol=1e-6)


_CUSTOM_CALL_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lopt_fast.meta import task_mesh
    from lopt_fast.meta.sharding import local_tasks
    mesh = task_mesh()
    assert mesh.size == 2, jax.devices()

    def opaque_step(a):  # a custom call with no partitioning rule, as a kernel launch is
        out = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape[:-1], jnp.int32),
               jax.ShapeDtypeStruct(a.shape[:-2], jnp.int32))
        return jax.ffi.ffi_call("lapack_sgetrf_ffi", out, vmap_method="broadcast_all")(a)[0]

    tasks = NamedSharding(mesh, P("tasks"))
    x = jax.ShapeDtypeStruct((4, 8, 8), jnp.float32, sharding=tasks)
    plain = jax.vmap(opaque_step)
    for name, fn in (("plain", plain), ("local_tasks", None)):
        with jax.set_mesh(mesh):  # compiled only: the LU call is a stand-in, not run
            fn = fn or local_tasks(plain, (0,))
            hlo = jax.jit(fn, out_shardings=tasks).lower(x).compile().as_text()
        calls = [l for l in hlo.splitlines() if "lapack_sgetrf_ffi" in l and "custom-call(" in l]
        print(name, "all-gather" in hlo, calls[0].split("=")[1].split("custom-call")[0].strip())
""")


def test_local_tasks_keeps_an_opaque_custom_call_on_each_devices_own_tasks():
    """Why the tasks' inner steps run in `shard_map` (`sharding.local_tasks`): XLA cannot
    partition a custom call without a rule (a kernel launch is one), so under plain `jit`
    sharding it gathers the whole task batch onto every device and runs it there; inside
    `local_tasks` each device calls it on its own 2 of the 4 tasks. Compiled (not run) for
    2 CPU devices with jaxlib's LU custom call standing in for a kernel."""
    proc = subprocess.run([sys.executable, "-c", _CUSTOM_CALL_SCRIPT], cwd=REPO,
                          env=host_devices_env(2, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("plain ", "local_tasks ")))
    assert lines["plain"].startswith("True (f32[4,8,8]"), proc.stdout  # gathered, all 4 tasks
    assert lines["local_tasks"].startswith("False (f32[2,8,8]"), proc.stdout


_KERNELS_PER_DEVICE_SCRIPT = textwrap.dedent("""
    import contextlib, math, jax, optax
    from lopt_fast.learned import AdafacMLPLOpt
    from lopt_fast.meta import (ConstantTruncationSchedule, OuterTrainer, TruncatedGrad,
                                TruncatedPES, VectorizedLOptTruncatedStep, task_mesh)
    from tests.test_meta_toys import Regression

    def kernel_calls(jaxpr, in_shard_map=False):
        # (inside a shard_map?, elements of its first operand: the tasks' constants) of
        # every pallas_call
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield in_shard_map, math.prod(eqn.invars[0].aval.shape)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)
                    if isinstance(sub, jax.extend.core.Jaxpr):
                        yield from kernel_calls(sub, in_shard_map or eqn.primitive.name == "shard_map")

    for name, mesh in (("single", None), ("sharded", task_mesh())):
        step = VectorizedLOptTruncatedStep(Regression(), AdafacMLPLOpt(hidden_size=4),
                                           ConstantTruncationSchedule(6), 2, backend="pallas")
        trainer = OuterTrainer([TruncatedPES(step, trunc_length=2),
                                TruncatedGrad(step, trunc_length=2)], optax.adam(1e-2), mesh=mesh)
        state = trainer.init(jax.random.key(0))
        datas = tuple(e.get_data() for e in trainer.estimators)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            jaxpr = trainer._compile(state, datas).trace(state, datas).jaxpr.jaxpr
        print(name, sorted(kernel_calls(jaxpr)))
""")


def test_sharded_meta_training_launches_the_kernels_per_device():
    """With a mesh, every fused-kernel launch of the outer step (PES and truncated backprop,
    the Pallas backend) is traced inside the tasks' `shard_map`, for half the tasks with 2
    devices (its per-task constants, the first operand, have half the elements); without
    one, none is."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _KERNELS_PER_DEVICE_SCRIPT],
                          cwd=REPO, env=host_devices_env(2, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1])  # noqa: S307 -- our own output
             for line in proc.stdout.splitlines() if line.startswith(("single ", "sharded "))}
    assert calls["single"] and len(calls["sharded"]) == len(calls["single"]), proc.stdout
    assert all(not inside for inside, _ in calls["single"]), calls
    assert all(inside for inside, _ in calls["sharded"]), calls
    assert sorted(2 * n for _, n in calls["sharded"]) == sorted(n for _, n in calls["single"])


def test_task_family_with_vmapped_configs_and_log_uniform_runs():
    from lopt_fast.tasks import QuadraticFamily

    step = VectorizedLOptTruncatedStep(QuadraticFamily(dim=3), LearnedLR(np.log(0.01)),
                                       LogUniformLengthSchedule(3, 12), 4,
                                       random_initial_iteration_offset=12)
    trainer = OuterTrainer([TruncatedPES(step, trunc_length=6)])
    state = trainer.init(jax.random.key(0))
    cfgs = state.worker_states[0].unroll_state.task_param
    assert cfgs["scale"].shape == (8, 3)
    np.testing.assert_array_equal(cfgs["scale"][0::2], cfgs["scale"][1::2])  # pairs share cfgs
    assert len({tuple(np.asarray(c)) for c in cfgs["scale"][0::2]}) == 4  # tasks differ
    for _ in range(4):
        state, metrics = trainer.update(state)
    assert np.isfinite(metrics["loss"]) and int(metrics["pes/resets"]) > 0
