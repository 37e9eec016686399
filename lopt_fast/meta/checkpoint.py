"""Atomic checkpoints of meta-training state.

A checkpoint is one `.npz` file holding every leaf of a `MetaTrainState` (theta,
outer optimizer state, worker states with their inner problems and PES
accumulators, PRNG key, step) under its tree path, plus a JSON `config` string the
caller can use to check that a resumed run is the same command. Writes go to a
temporary file in the same folder, are flushed and fsync'ed, then `os.replace`d over
the old checkpoint (and the folder is fsync'ed), so a crash at any point leaves the
previous checkpoint intact.

    save_checkpoint("runs/x/checkpoint.npz", state, config={"task": "digits-mlp"})
    state = load_checkpoint("runs/x/checkpoint.npz", template=trainer.init(key))
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast._atomic import atomic_savez
from lopt_fast.meta import sharding as sharding_lib

_CONFIG = "__config__"
_KEY_SUFFIX = "#prng_key"


def _is_prng_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _flatten(state: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree.leaves_with_path(state):
        name = jax.tree_util.keystr(path)
        if _is_prng_key(leaf):
            out[name + _KEY_SUFFIX] = _to_host(jax.random.key_data(leaf))
        else:
            out[name] = _to_host(leaf)
    return out


def save_checkpoint(path: str | os.PathLike, state: Any, config: dict | None = None) -> None:
    """Write `state` (any pytree of arrays) to `path` atomically.

    In a multi-process run every process must call this (arrays are gathered);
    only process 0 writes.
    """
    path = os.fspath(path)
    flat = _flatten(state)
    flat[_CONFIG] = np.asarray(json.dumps(config or {}, sort_keys=True))
    if jax.process_index() != 0:
        return
    atomic_savez(path, flat)


def checkpoint_config(path: str | os.PathLike) -> dict:
    """The `config` dict stored with a checkpoint."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return json.loads(str(data[_CONFIG])) if _CONFIG in data.files else {}


def load_checkpoint(path: str | os.PathLike, template: Any) -> Any:
    """Read a checkpoint into the structure (and shardings) of `template`.

    Raises:
      FileNotFoundError: no checkpoint at `path`.
      ValueError: the checkpoint does not match `template` (names, shapes or dtypes).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    leaves_with_path, treedef = jax.tree.flatten_with_path(template)
    new_leaves = []
    with np.load(path, allow_pickle=False) as data:
        expected = set()
        for tree_path, leaf in leaves_with_path:
            name = jax.tree_util.keystr(tree_path)
            is_key = _is_prng_key(leaf)
            stored = name + _KEY_SUFFIX if is_key else name
            expected.add(stored)
            if stored not in data.files:
                raise ValueError(f"checkpoint {path!r} has no entry {stored!r}; it was written "
                                 f"by a different configuration")
            value = data[stored]
            ref = jax.random.key_data(leaf) if is_key else leaf
            if value.shape != np.shape(ref) or value.dtype != np.dtype(ref.dtype):
                raise ValueError(f"checkpoint entry {stored!r} is {value.dtype}{list(value.shape)}"
                                 f", expected {np.dtype(ref.dtype)}{list(np.shape(ref))}")
            arr = jnp.asarray(value)
            if is_key:
                arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(leaf))
            sharding = getattr(leaf, "sharding", None)
            new_leaves.append(sharding_lib.put(arr, sharding) if sharding is not None else arr)
        extra = set(data.files) - expected - {_CONFIG}
        if extra:
            raise ValueError(f"checkpoint {path!r} has entries the current state lacks: "
                             f"{sorted(extra)[:5]}")
    return jax.tree.unflatten(treedef, new_leaves)
