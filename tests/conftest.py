"""The suite's XLA settings, set before any test starts a JAX backend.

On a CPU the suite's time goes mostly to XLA compiling (tiny arrays, hundreds of
programs, the Pallas and Triton kernels interpreted), so XLA's backend optimisation level
is 0 there: test_benchmarks.py and test_pallas_step.py took 227 s instead of 297 s on 2
cores (2026-12-02). Levels change no results the tests depend on (the kernels and the
reference compile alike; no fast-math at any level). Where jax's CUDA plugin is
installed, the kernels compile for the GPU and the GPU tolerances were measured with the
default level, so the setting stays as it is.
Subprocesses inherit it through XLA_FLAGS (`helpers.host_devices_env` adds a device count).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "profiling"))
from xla_kernels import cuda_plugin_installed  # noqa: E402  (profiling/: stdlib imports only)

_OPT_LEVEL = "--xla_backend_optimization_level"

if not cuda_plugin_installed() and _OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_LEVEL}=0".strip()
