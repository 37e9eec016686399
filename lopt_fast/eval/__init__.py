"""Evaluating optimizers: training curves of one task, and the tutorial's figures.

    from lopt_fast.eval import single_task_training_curves, plot_lr_sweep
    curves = single_task_training_curves(task, Adam(1e-3), num_steps=200, key=key)
"""

from lopt_fast.eval.plotting import best_lr, plot_lr_sweep, plot_training_curves, summarize_curves
from lopt_fast.eval.training_curves import (
    DEFAULT_SPLITS,
    PROGRESS_MIN_STEPS,
    SPLITS,
    single_task_training_curves,
)

__all__ = [
    "DEFAULT_SPLITS",
    "PROGRESS_MIN_STEPS",
    "SPLITS",
    "best_lr",
    "plot_lr_sweep",
    "plot_training_curves",
    "single_task_training_curves",
    "summarize_curves",
]
