"""Lowering the Pallas kernels for an NVIDIA GPU on a machine that has none.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` lowers the fused step for a
GPU from a CPU-only machine: the tests check the kernels' launches and aliases that way,
and `profiling/pallas_resources.py` compiles their Triton modules for sm_90. Since JAX
0.11 Pallas' Triton lowering asks which GPU it compiles for, and with no GPU device it
raises "No supported GPU devices found, please specify an abstract GPU device"; an
abstract mesh whose device is a GPU answers instead. JAX 0.10 does not ask (the lowering
is the same with or without it), and a JAX without `jax.sharding.AbstractDevice` gets
no mesh.

    with abstract_gpu():
        lowered = jax.jit(step).trace(theta, state, grads).lower(lowering_platforms=("cuda",))
"""

from __future__ import annotations

import contextlib

import jax

# The GPU the CPU lowerings target: the project's benchmark machines are H100 / H200
# (sm_90, what `profiling/pallas_resources.py` compiles for).
DEFAULT_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def abstract_gpu(device_kind: str = DEFAULT_DEVICE_KIND, axes: dict[str, int] | None = None):
    """Lowerings inside compile for an NVIDIA GPU of `device_kind` (its compute
    capability), whatever devices this machine has; `axes` (name: size) makes the abstract
    mesh one of several such GPUs, for lowering sharded code (e.g. {"tasks": 2})."""
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice"):
        if axes:
            raise RuntimeError(f"jax {jax.__version__} has no jax.sharding.AbstractDevice: "
                               "no abstract mesh of GPUs to lower for")
        yield
        return
    device = sharding.AbstractDevice(device_kind, None, "cuda")
    names, sizes = zip(*(axes or {"gpu": 1}).items(), strict=True)
    with sharding.use_abstract_mesh(sharding.AbstractMesh(sizes, names, abstract_device=device)):
        yield
