"""The suite's XLA settings, set before any test starts a JAX backend.

On a CPU the suite's time goes mostly to XLA compiling (tiny arrays, hundreds of
programs, the Pallas and Triton kernels interpreted), so XLA's backend optimisation level
is 0 there: test_benchmarks.py and test_pallas_step.py took 227 s instead of 297 s on 2
cores (2026-12-02). Levels change no results the tests depend on (the kernels and the
reference compile alike; no fast-math at any level). Where jax's CUDA plugin is
installed, the kernels compile for the GPU and the GPU tolerances were measured with the
default level, so the setting stays as it is.
Subprocesses inherit it through XLA_FLAGS; tests that set their own flags append to it.
"""

import importlib.util
import os

_OPT_LEVEL = "--xla_backend_optimization_level"


def _cuda_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


if not _cuda_plugin_installed() and _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_LEVEL}=0".strip()
