"""lopt_fast: fast learned optimizers in JAX, compatible with learned_optimization weights.

    from lopt_fast import AdafacMLPLOpt, tasks, eval
    task = tasks.DigitsMLP()
    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    opt = lopt.opt_fn(theta)
"""

from lopt_fast import learned, meta, optimizers, tasks
from lopt_fast.backends import BackendUnavailableError, available_backends, resolve_backend
from lopt_fast.learned import (
    AdafacMLPLOpt,
    AdafacMLPLOptState,
    LearnedOptimizer,
    as_optax,
    load_theta,
    save_theta,
)
from lopt_fast.optimizers import SGD, SGDM, Adam, AdamW, OptaxOptimizer, Optimizer

__version__ = "0.1.0"

__all__ = [
    "AdafacMLPLOpt",
    "AdafacMLPLOptState",
    "Adam",
    "AdamW",
    "BackendUnavailableError",
    "LearnedOptimizer",
    "OptaxOptimizer",
    "Optimizer",
    "SGD",
    "SGDM",
    "as_optax",
    "available_backends",
    "learned",
    "load_theta",
    "meta",
    "optimizers",
    "resolve_backend",
    "save_theta",
    "tasks",
]
