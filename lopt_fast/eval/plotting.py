"""Figures and summaries like the tutorial's: an Adam learning-rate sweep against
another optimizer (e.g. a meta-trained learned optimizer).

matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

Curves = Mapping[str, np.ndarray]


def _mean_curve(curves: Sequence[Curves], key: str = "eval/train/loss") -> np.ndarray:
    return np.mean([np.asarray(c[key], np.float64) for c in curves], axis=0)


def summarize_curves(curves: Sequence[Curves], key: str = "eval/train/loss") -> dict[str, float]:
    """Mean over seeds of the mean and of the final value of `key` (the tutorial's two numbers)."""
    if not curves:
        raise ValueError("summarize_curves needs at least one curves dict")
    mean = _mean_curve(curves, key)
    return {"mean_train_loss": float(np.mean(mean)), "final_train_loss": float(mean[-1])}


def best_lr(curves_for_lr: Mapping[float, Sequence[Curves]], metric: str = "mean") -> float:
    """The learning rate with the lowest mean ("mean") or final ("final") training loss."""
    if metric not in ("mean", "final"):
        raise ValueError(f"metric must be 'mean' or 'final', got {metric!r}")
    field = f"{metric}_train_loss"
    return min(curves_for_lr, key=lambda lr: summarize_curves(curves_for_lr[lr])[field])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves_by_label: Mapping[str, Sequence[Curves]], path: str | os.PathLike,
                         title: str | None = None) -> str:
    """Mean training-loss curve per label; writes a PNG and returns its path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curves in curves_by_label.items():
        ax.plot(curves[0]["eval/xs"], _mean_curve(curves), label=label)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("training loss")
    if title:
        ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_lr_sweep(curves_for_lr: Mapping[float, Sequence[Curves]], path: str | os.PathLike,
                  other: Mapping[str, Sequence[Curves]] | None = None,
                  title: str | None = None) -> str:
    """The tutorial's figure: left, the mean training curve per Adam learning rate (and
    `other` optimizers in black); right, last and mean training loss against the learning
    rate, with `other` as horizontal lines. Writes a PNG and returns its path."""
    if not curves_for_lr:
        raise ValueError("plot_lr_sweep needs at least one learning rate")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    cmap = plt.get_cmap("viridis")
    lrs = sorted(curves_for_lr)
    for i, lr in enumerate(lrs):
        curves = curves_for_lr[lr]
        left.plot(curves[0]["eval/xs"], _mean_curve(curves), color=cmap(i / max(len(lrs) - 1, 1)),
                  label=f"Adam lr={lr:g}")
    summaries = [summarize_curves(curves_for_lr[lr]) for lr in lrs]
    right.semilogx(lrs, [s["final_train_loss"] for s in summaries], "o-", label="Adam last loss")
    right.semilogx(lrs, [s["mean_train_loss"] for s in summaries], "o-", label="Adam mean loss")
    for j, (label, curves) in enumerate((other or {}).items()):
        style = ["-", "--", ":"][j % 3]
        left.plot(curves[0]["eval/xs"], _mean_curve(curves), color="k", lw=2.5, ls=style, label=label)
        s = summarize_curves(curves)
        right.axhline(s["final_train_loss"], color="C0", ls=style, lw=1.5, label=f"{label} last loss")
        right.axhline(s["mean_train_loss"], color="C1", ls=style, lw=1.5, label=f"{label} mean loss")
    left.set_xlabel("training iteration")
    left.set_ylabel("training loss")
    left.legend(fontsize=8)
    right.set_xlabel("learning rate")
    right.set_ylabel("training loss")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
