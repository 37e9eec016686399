"""Training curves of one task under one optimizer, and the tutorial's figures."""

from lopt_fast.eval.plotting import best_lr, plot_lr_sweep, plot_training_curves, summarize_curves
from lopt_fast.eval.training_curves import SPLITS, single_task_training_curves

__all__ = [
    "SPLITS",
    "best_lr",
    "plot_lr_sweep",
    "plot_training_curves",
    "single_task_training_curves",
    "summarize_curves",
]
