"""Backend choice for learned-optimizer updates: "auto" | "reference" | "pallas" | "triton".

The environment variable `LOPT_FAST_BACKEND` overrides the argument. "auto" picks the
fastest backend that can run on the default device; an explicit choice that cannot
run raises `BackendUnavailableError` saying why.

A backend is an object with `name` and
`update(lopt, theta, state, grad) -> (new_params, LeafAccumulators of trees)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

BACKENDS = ("auto", "reference", "pallas", "triton")
ENV_VAR = "LOPT_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    update: Callable


def _reference() -> Backend:
    from lopt_fast.learned.adafac_mlp import reference_update

    return Backend("reference", reference_update)


def _unavailable_reason(name: str) -> str | None:
    """None if backend `name` can run on this machine, else why not."""
    if name == "reference":
        return None
    return f"the {name!r} backend is not built yet in this version of lopt_fast"


def _make(name: str) -> Backend:
    if name == "reference":
        return _reference()
    raise BackendUnavailableError(_unavailable_reason(name))


def available_backends() -> list[str]:
    return [b for b in BACKENDS[1:] if _unavailable_reason(b) is None]


def resolve_backend(backend: str = "auto") -> Backend:
    """The backend to use for `backend` (after the `LOPT_FAST_BACKEND` override)."""
    requested = os.environ.get(ENV_VAR) or backend
    if requested not in BACKENDS:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "backend"
        raise ValueError(f"{source}={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        # Kernels are only faster on GPUs; the reference is the CPU production path.
        return _make("reference")
    reason = _unavailable_reason(requested)
    if reason is not None:
        raise BackendUnavailableError(f"backend {requested!r} cannot run: {reason}")
    return _make(requested)
