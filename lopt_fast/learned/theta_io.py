"""Save and load meta-parameters (theta) as one `.npz` file.

Keys are the '/'-joined paths of the nested dict, e.g. ``nn/~/w0``, so a theta
tree with learned_optimization's names round-trips unchanged. Writes are atomic
(temporary file + rename): a crash never leaves a half-written theta behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lopt_fast._atomic import atomic_savez

_SEP = "/"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if _SEP in key:
            raise ValueError(f"theta key {key!r} contains {_SEP!r}, which save_theta reserves")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + _SEP))
        else:
            out[path] = np.asarray(value)
    return out


def save_theta(path: str | os.PathLike, theta: Mapping[str, Any]) -> None:
    """Write `theta` (a nested dict of arrays) to `path` atomically."""
    path = os.fspath(path)
    flat = _flatten(theta)
    atomic_savez(path, flat)


def load_theta(path: str | os.PathLike) -> dict[str, Any]:
    """Read a theta written by `save_theta` back into a nested dict of jnp arrays."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no theta file at {path!r}")
    theta: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as data:
        for flat_key in data.files:
            node = theta
            *parents, leaf = flat_key.split(_SEP)
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(data[flat_key])
    return theta
