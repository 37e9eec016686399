"""How the reference update runs under `jax.vmap` over tasks (meta-training's shape).

Plain `vmap` turns each tensor's update into one update of a [tasks, *shape] array.
For a big tensor that defeats the chunked features -> MLP pass (`adafac_math`): its
chunks become `tasks` times larger and the [chunk, H] activations leave the cache.
So, under `vmap`, a tensor with more than `GROUP_ELEMENTS` entries across the batch
is updated for groups of tasks in turn (a `lax.map` over groups, `vmap` within one),
each group at most `GROUP_ELEMENTS` entries or a single task (which is then chunked
as in the unbatched case); smaller tensors keep plain `vmap`.

Measured on a 2-core CPU (update step alone, vmapped over tasks with per-task theta):
8 tasks x the small conv model (3x3 convs 3->32->64->64) 68 -> 47 ms and 16 tasks
154 -> 94 ms against plain `vmap`; 16 tasks x the digits convnet (4.6K-entry kernels)
7.3 -> 7.7 ms. Groups of 1, 4 and 16 chunks' worth were tried; 4 was best.

`custom_vmap` has no autodiff rules of its own, so the function is also a
`custom_jvp` whose rule is the JVP of the plain update (the same math, batched by
plain vmap); JAX transposes it for reverse mode, so `jax.grad` and `jax.jvp` both work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lopt_fast.learned import adafac_math as am

# Most entries updated at once across a group of tasks (see the module docstring).
GROUP_ELEMENTS = 4 * am.CHUNK_ELEMENTS


def _broadcast_unbatched(axis_size, in_batched, args):
    def one(x, batched):
        return x if batched else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))

    return tuple(jax.tree.map(one, a, b) for a, b in zip(args, in_batched, strict=True))


def _group_size(axis_size: int, elements_per_task: int, group_elements: int) -> int:
    """Tasks per group: the largest divisor of `axis_size` whose group has at most
    `group_elements` entries (at least 1)."""
    limit = max(1, group_elements // max(1, elements_per_task))
    return max(d for d in range(1, min(limit, axis_size) + 1) if axis_size % d == 0)


def tasks_in_turn(fn, elements_per_task: int, group_elements: int = GROUP_ELEMENTS):
    """`fn(*args)`, whose vmap runs groups of tasks in turn when the batch is large.

    Args:
      fn: a function of arrays (pytrees of arrays) for one task.
      elements_per_task: size of the tensor `fn` updates for one task.
      group_elements: most entries updated at once across a group of tasks.
    """

    def vmap_rule(axis_size, in_batched, *args):
        args = _broadcast_unbatched(axis_size, in_batched, args)
        group = _group_size(axis_size, elements_per_task, group_elements)
        if group == axis_size:
            out = jax.vmap(fn)(*args)
        else:  # lax.map's own batch_size cannot reshape the zero-size [3, 0] state slots.
            groups = axis_size // group
            split = lambda x: x.reshape((groups, group) + x.shape[1:])  # noqa: E731
            out = lax.map(lambda xs: jax.vmap(fn)(*xs), jax.tree.map(split, args))
            out = jax.tree.map(lambda y: y.reshape((axis_size,) + y.shape[2:]), out)
        return out, jax.tree.map(lambda _: True, out)

    batched = jax.custom_batching.custom_vmap(fn)
    batched.def_vmap(vmap_rule)

    @jax.custom_jvp
    def update(*args):
        return batched(*args)

    @update.defjvp
    def update_jvp(primals, tangents):
        return jax.jvp(fn, primals, tangents)

    return update


def leaf_update(p, g, acc, nn, decays, iteration, exp_mult: float, step_mult: float):
    """`adafac_math.leaf_update`, with tasks updated in turn under vmap (module docstring)."""
    fn = functools.partial(_leaf_update, exp_mult=exp_mult, step_mult=step_mult)
    return tasks_in_turn(fn, p.size)(p, g, acc, nn, decays, iteration)


def _leaf_update(p, g, acc, nn, decays, iteration, *, exp_mult, step_mult):
    return am.leaf_update(p, g, am.LeafAccumulators(*acc), nn, decays, iteration, exp_mult,
                          step_mult)
