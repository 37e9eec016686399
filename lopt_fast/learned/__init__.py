"""Learned optimizers."""

from lopt_fast.learned.adafac_mlp import AdafacMLPLOpt, AdafacMLPLOptState, reference_update
from lopt_fast.learned.base import LearnedOptimizer, MetaParams
from lopt_fast.learned.optax_bridge import LOptOptaxState, as_optax
from lopt_fast.learned.theta_io import load_theta, save_theta

__all__ = [
    "AdafacMLPLOpt",
    "AdafacMLPLOptState",
    "LearnedOptimizer",
    "LOptOptaxState",
    "MetaParams",
    "as_optax",
    "load_theta",
    "reference_update",
    "save_theta",
]
