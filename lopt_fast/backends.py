"""Backend choice for learned-optimizer updates: "auto" | "reference" | "pallas" | "triton".

The environment variable `LOPT_FAST_BACKEND` overrides the argument. "auto" picks the
fastest backend that can run on the default device; an explicit choice that cannot
run raises `BackendUnavailableError` saying why.

  reference  pure JAX (`lopt_fast.learned.adafac_mlp.reference_update`); runs everywhere.
  pallas     fused Pallas kernels (`lopt_fast.pallas`): on an NVIDIA GPU through Pallas'
             Triton lowering; on CPU in Pallas' interpreter (correct, slow: for tests
             and debugging, never picked by "auto"; asking for it warns).
  triton     fused Triton kernels through jax-triton (`lopt_fast.kernels`): an NVIDIA
             GPU and the `gpu` extra (`jax-triton`, `triton`).

"auto": the reference on CPU (the kernels only pay off on a GPU; interpreted they are
orders of magnitude slower); on an NVIDIA GPU "pallas", else (a JAX without Pallas'
Triton lowering) "triton" when jax-triton is installed; the reference elsewhere.

A backend is an object with `name` and
`update(lopt, theta, state, grad) -> (new_params, LeafAccumulators of trees)`.

`in_place` (kernel backends): the update writes params and state into their buffers,
which is free when the caller donates the state or carries it through `lax.scan`, and
costs XLA a copy of them otherwise; `in_place=False` writes fresh buffers, the faster
choice for a caller that does not donate (`lopt_fast.pallas.plan.in_place_aliases`).

`mlp_precision` (kernel backends): the operands of the MLP's tensor-core dots, one of
`lopt_fast.pallas.blocks.MLP_PRECISIONS`: "tf32", "tf32_fp16" (the raw features' dot on
TF32, the operands of unit scale after it on fp16, the same mantissa), "bf16" (faster,
coarser) or "ieee" (float32); None (the default) leaves each kernel backend its own
default, `pallas_update`'s / `triton_update`'s keyword (both "tf32" now), so a
measured change of one backend's default is made in one place. The reference runs its
dots at JAX's default precision whatever this says.

`kernel_options` (kernel backends): more keyword arguments of the backend's update, for
tuning the kernels without calling them directly: `pallas_update`'s `layer1`, `blocks`,
`packed_blocks`, `reduction_blocks`, `early_weights`, `tile_order`; `triton_update`'s
`layer1`, `blocks`, `packed_blocks`, `reduction_blocks`, `persistent`, `launcher`,
`compute_capability`. A name the chosen backend's update does not take raises
`ValueError` (so options for one kernel backend fail loudly on the other); the reference
ignores them, as it ignores `mlp_precision`, so the same call runs on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import os
import warnings
from collections.abc import Callable

import jax

BACKENDS = ("auto", "reference", "pallas", "triton")
ENV_VAR = "LOPT_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    update: Callable


def _platform() -> str:
    """'cpu', 'cuda', 'rocm', 'tpu' or another platform name of the default device."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "").lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def _unavailable_reason(name: str) -> str | None:
    """None if backend `name` can run on this machine, else why not."""
    if name == "reference":
        return None
    platform = _platform()
    if name == "pallas":
        if platform == "cpu":
            return None
        if platform == "cuda":  # JAX 0.11 deprecates Pallas' Triton lowering
            return _import_error("jax.experimental.pallas.triton")
        return (f"the Pallas kernels lower through Pallas' Triton backend (NVIDIA GPUs) or run "
                f"interpreted on CPU; the default device here is {platform!r}")
    if name == "triton":
        if platform != "cuda":
            return (f"the Triton kernels need an NVIDIA GPU (jax default backend is "
                    f"{jax.default_backend()!r})")
        missing = [m for m in ("triton", "jax_triton") if importlib.util.find_spec(m) is None]
        if missing:
            return (f"module(s) {', '.join(missing)} not installed: "
                    f"pip install 'lopt-fast[gpu]' (jax-triton, triton)")
        return _import_error("jax_triton")
    raise ValueError(f"unknown backend {name!r}")


def _import_error(module: str) -> str | None:
    """None if `module` imports, else why not: an installed jax-triton built against
    another jax can fail at import (it reaches into jax internals), and `auto` should then
    fall back to the Pallas kernels instead of failing."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any failure means the backend cannot run
        return f"{module} is installed but does not import with jax {jax.__version__}: {e!r}"
    return None


# The kernel updates' keywords that resolve_backend sets itself, not `kernel_options`.
_OWN_KEYWORDS = ("interpret", "in_place", "mlp_precision")


def _kernel_keywords(name: str, update: Callable, mlp_precision: str | None,
                     kernel_options: dict | None) -> dict:
    """The keywords a kernel backend's `update` gets besides interpret / in_place:
    `kernel_options`, checked against its signature, and `mlp_precision` unless None (the
    kernel's own default precision, not passed)."""
    options = dict(kernel_options or {})
    accepted = [k for k, p in inspect.signature(update).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _OWN_KEYWORDS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"kernel_options {', '.join(map(repr, unknown))} are not options of "
                         f"the {name!r} backend's update; it takes {', '.join(accepted)} "
                         f"(and in_place, mlp_precision as their own arguments)")
    if mlp_precision is not None:
        options["mlp_precision"] = mlp_precision
    return options


def _make(name: str, in_place: bool = True, mlp_precision: str | None = None,
          kernel_options: dict | None = None) -> Backend:
    if name == "reference":
        from lopt_fast.learned.adafac_mlp import reference_update

        return Backend("reference", reference_update)
    if name == "pallas":
        from lopt_fast.pallas import pallas_update

        options = _kernel_keywords(name, pallas_update, mlp_precision, kernel_options)
        interpret = _platform() == "cpu"
        return Backend("pallas-interpret" if interpret else "pallas",
                       functools.partial(pallas_update, interpret=interpret, in_place=in_place,
                                         **options))
    if name == "triton":
        from lopt_fast.kernels import triton_update

        options = _kernel_keywords(name, triton_update, mlp_precision, kernel_options)
        return Backend("triton", functools.partial(triton_update, in_place=in_place, **options))
    raise BackendUnavailableError(_unavailable_reason(name))


def available_backends() -> list[str]:
    return [b for b in BACKENDS[1:] if _unavailable_reason(b) is None]


def auto_backend_name() -> str:
    """What "auto" resolves to on the default device: on an NVIDIA GPU the Pallas kernels
    (on an H200 as fast as or faster than the Triton ones: 12-13% at 1e8 parameters and
    7-13% at 64 tasks x the small convnet in two runs, as fast in PES meta-training:
    benchmarks/RESULTS.md; and they need no jax-triton), else the Triton kernels when
    they can run; the reference elsewhere."""
    if _platform() != "cuda":
        return "reference"
    return next((b for b in ("pallas", "triton") if _unavailable_reason(b) is None),
                "reference")


def resolve_backend(backend: str = "auto", in_place: bool = True,
                    mlp_precision: str | None = None,
                    kernel_options: dict | None = None) -> Backend:
    """The backend to use for `backend` (after the `LOPT_FAST_BACKEND` override); `in_place`,
    `mlp_precision` and `kernel_options` as the module docstring says (the reference has no
    such choices)."""
    from lopt_fast.pallas.blocks import MLP_PRECISIONS

    requested = os.environ.get(ENV_VAR) or backend
    if requested not in BACKENDS:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "backend"
        raise ValueError(f"{source}={requested!r} is not one of {', '.join(BACKENDS)}")
    if mlp_precision is not None and mlp_precision not in MLP_PRECISIONS:
        raise ValueError(f"mlp_precision={mlp_precision!r} is not one of "
                         f"{', '.join(MLP_PRECISIONS)}")
    if requested == "auto":
        return _make(auto_backend_name(), in_place, mlp_precision, kernel_options)
    reason = _unavailable_reason(requested)
    if reason is not None:
        raise BackendUnavailableError(f"backend {requested!r} cannot run: {reason}")
    if requested == "pallas" and _platform() == "cpu":
        warnings.warn("backend 'pallas' on CPU runs the kernels in Pallas' interpreter: "
                      "correct, but orders of magnitude slower than 'reference' (for tests "
                      "and debugging; 'auto' picks 'reference' here)", UserWarning, stacklevel=2)
    return _make(requested, in_place, mlp_precision, kernel_options)
