"""Optimizer interface and hand-designed baselines."""

from lopt_fast.optimizers.base import Optimizer, check_same_structure
from lopt_fast.optimizers.baselines import SGD, SGDM, Adam, AdamW, OptaxOptimizer, OptaxState

__all__ = [
    "Optimizer",
    "OptaxOptimizer",
    "OptaxState",
    "SGD",
    "SGDM",
    "Adam",
    "AdamW",
    "check_same_structure",
]
