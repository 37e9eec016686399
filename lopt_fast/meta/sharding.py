"""Sharding the task axis of meta-training over devices (`jax.jit` + `NamedSharding`).

One mesh axis, "tasks". Every worker-state leaf has a leading task axis (antithetic
pairs included) and is split over it; theta, the outer optimizer state, the PRNG key
and the step counter are replicated. Host-fetched data batches are split on their
task axis (axis 1: `[T, num_tasks, ...]`); device-resident data pools are replicated.
The jitted outer step then runs each device's tasks locally, and the mean over
tasks that forms the meta-gradient becomes an all-reduce inserted by XLA, so every
device ends the step with the same theta. The inner steps of the tasks run inside
`jax.shard_map` (`local_tasks`): XLA cannot partition the kernel backends' custom calls
and would otherwise gather every task's state onto every device to run the whole update
there.

Multi-host: call `jax.distributed.initialize()` first in every process; `task_mesh()`
then spans `jax.devices()` (all hosts) and the same program runs everywhere (see
docs/META.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "tasks"


def task_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "tasks" over `devices` (default: all devices, every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def along_axis(mesh: Mesh, axis: int | None) -> NamedSharding:
    """Split dimension `axis` over the mesh (None: replicate)."""
    if axis is None:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS))


def tree_shardings(mesh: Mesh, tree: Any, axes: Any) -> Any:
    """Shardings for `tree`; `axes` is a prefix tree of task axes (int or None)."""
    return jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: along_axis(mesh, ax), sub),
                        axes, tree, is_leaf=lambda x: x is None)


def check_divisible(mesh: Mesh, tree: Any, axes: Any, what: str) -> None:
    """Raise a clear error when a task axis does not split evenly over the mesh."""
    size = mesh.size

    def check(ax, sub):
        if ax is None:
            return
        for path, leaf in jax.tree.leaves_with_path(sub):
            n = np.shape(leaf)[ax]
            if n % size:
                raise ValueError(
                    f"{what}{jax.tree_util.keystr(path)} has {n} tasks on axis {ax}, which does "
                    f"not split over {size} devices; use a num_tasks that is a multiple of {size}")

    jax.tree.map(check, axes, tree, is_leaf=lambda x: x is None)


def local_tasks(fn: Callable, in_axes: tuple[int | None, ...]) -> Callable:
    """`fn`, vmapped over tasks (`in_axes` as `jax.vmap`'s: 0 or None per argument; its
    outputs' task axis 0), with each device running its own tasks: `jax.shard_map` over
    the "tasks" axis of the mesh in context (`jax.set_mesh`, which `OuterTrainer.update`
    sets); `fn` itself without one.

    Why: a kernel backend's step is a custom call without a partitioning rule, and XLA's
    partitioner replicates the operands of such a call: under plain `jit` sharding every
    device would gather all tasks' params, gradients and optimizer state and run the
    whole batch's update (an unannotated custom call compiled for 2 CPU devices gets an
    all-gather of the batch axis before it: tests/test_meta_trainer.py). Inside
    `shard_map` the kernels are traced, and launched, for the device's own tasks. The
    tasks' steps are independent (their keys are split before the call), so the result
    is the unsharded one.
    """
    if any(a not in (0, None) for a in in_axes):
        raise ValueError(f"local_tasks takes task axes 0 or None, got {in_axes}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return fn
    specs = tuple(PartitionSpec() if a is None else PartitionSpec(AXIS) for a in in_axes)
    # check_vma=False: pallas_call's outputs carry no varying-axes type (the check would
    # reject them); without it the cotangents of replicated inputs are still psummed.
    return jax.shard_map(fn, in_specs=specs, out_specs=PartitionSpec(AXIS),
                         axis_names={AXIS}, check_vma=False)


def put(tree: Any, shardings: Any) -> Any:
    """Place a host or device tree onto its shardings.

    With one process this is `jax.device_put`. With several, `device_put` cannot
    target devices of other processes; but every process runs the same program from
    the same seed and so holds the same global value, from which each builds its own
    shards (`jax.make_array_from_callback`). Arrays that are already global pass as is.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_global_from_same_value, tree, shardings)


def _global_from_same_value(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _global_from_same_value(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=impl)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
