"""The tutorial's figures and summary numbers for training curves.

The usual workflow: an Adam learning-rate sweep (several seeds per learning rate)
compared with another optimizer, e.g. a meta-trained learned optimizer:

    sweep = {lr: [single_task_training_curves(task, Adam(lr), 200, k) for k in keys]
             for lr in lrs}
    lopt_curves = [single_task_training_curves(task, lopt.opt_fn(theta), 200, k) for k in keys]
    plot_lr_sweep(sweep, "sweep.png", other={"learned": lopt_curves})
    best = best_lr(sweep)

Every function takes lists of curves dicts (one per seed) and averages over seeds as
the tutorial does. Figures are drawn with matplotlib's Agg canvas, without pyplot: no
display is needed and the caller's pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

Curves = Mapping[str, np.ndarray]
DEFAULT_KEY = "eval/train/loss"


def _mean_curve(curves: Sequence[Curves], key: str = DEFAULT_KEY) -> tuple[np.ndarray, np.ndarray]:
    """(xs, mean over seeds of `key`); the seeds must share their `eval/xs`."""
    if not curves:
        raise ValueError("need at least one curves dict (one per seed), got an empty list")
    missing = [i for i, c in enumerate(curves) if key not in c or "eval/xs" not in c]
    if missing:
        raise ValueError(f"curves {missing} lack {key!r} or 'eval/xs'; "
                         "pass dicts from single_task_training_curves")
    xs = np.asarray(curves[0]["eval/xs"])
    if any(not np.array_equal(np.asarray(c["eval/xs"]), xs) for c in curves[1:]):
        raise ValueError("all seeds' curves must share eval/xs (same num_steps and eval_every)")
    return xs, np.mean([np.asarray(c[key], np.float64) for c in curves], axis=0)


def summarize_curves(curves: Sequence[Curves], key: str = DEFAULT_KEY) -> dict[str, float]:
    """The tutorial's two numbers for one optimizer: mean and final loss, averaged over seeds.

    Args:
      curves: one `single_task_training_curves` dict per seed.
      key: which curve to summarise (default: the evaluated training loss).

    Returns:
      `{"mean_train_loss": mean over seeds and evaluations,
        "final_train_loss": mean over seeds of the last evaluation}`.

    Example:
        >>> summarize_curves([curves_seed0, curves_seed1])
        {'mean_train_loss': 0.61, 'final_train_loss': 0.23}
    """
    _, mean = _mean_curve(curves, key)
    return {"mean_train_loss": float(np.mean(mean)), "final_train_loss": float(mean[-1])}


def best_lr(curves_for_lr: Mapping[float, Sequence[Curves]], metric: str = "mean",
            key: str = DEFAULT_KEY) -> float:
    """The learning rate with the lowest seed-averaged mean or final loss.

    Diverged runs (NaN/inf) rank last.

    Args:
      curves_for_lr: learning rate -> one curves dict per seed.
      metric: "mean" (loss averaged over training, the tutorial's choice) or "final".
      key: which curve to rank by.

    Example:
        >>> best_lr({1e-3: curves_a, 1e-2: curves_b}, metric="final")
        0.01
    """
    if metric not in ("mean", "final"):
        raise ValueError(f"metric must be 'mean' or 'final', got {metric!r}")
    if not curves_for_lr:
        raise ValueError("best_lr needs at least one learning rate")
    field = f"{metric}_train_loss"

    def score(lr: float) -> float:
        value = summarize_curves(curves_for_lr[lr], key)[field]
        return value if math.isfinite(value) else math.inf

    return min(curves_for_lr, key=score)


def _figure(**kwargs):
    """A standalone Agg figure: no pyplot state, no backend switch (safe in notebooks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _clip_ylim(ax, curves_means: Sequence[np.ndarray], logy: bool) -> None:
    """Keep diverging curves (huge or NaN losses) from squashing the others."""
    starts = [m[0] for m in curves_means if np.isfinite(m[0])]
    finite = np.concatenate([m[np.isfinite(m)] for m in curves_means] or [np.zeros(0)])
    if not starts or finite.size == 0:
        return
    top = 1.25 * max(starts)
    low = finite.min()
    if logy and low > 0:
        ax.set_ylim(low / 1.25, top)
    elif not logy:
        ax.set_ylim(min(0.0, low), top)


def plot_training_curves(curves_by_label: Mapping[str, Sequence[Curves]], path: str | os.PathLike,
                         title: str | None = None, key: str = DEFAULT_KEY,
                         logy: bool = False) -> str:
    """Plot the seed-averaged training-loss curve of each optimizer; write a PNG.

    Args:
      curves_by_label: label (e.g. "Adam lr=1e-3", "learned") -> one curves dict per seed.
      path: output PNG path (parent folders are created).
      title: optional figure title.
      key: which curve to plot against `eval/xs`.
      logy: log-scale loss axis.

    Returns:
      The path written.

    Example:
        >>> plot_training_curves({"Adam": adam_curves, "learned": lopt_curves}, "curves.png")
        'curves.png'
    """
    if not curves_by_label:
        raise ValueError("plot_training_curves needs at least one label")
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
    means = []
    for label, curves in curves_by_label.items():
        xs, mean = _mean_curve(curves, key)
        ax.plot(xs, mean, label=f"{label} ({len(curves)} seeds)")
        means.append(mean)
    _finish_axis(ax, "training iteration", "training loss", logy)
    _clip_ylim(ax, means, logy)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_lr_sweep(curves_for_lr: Mapping[float, Sequence[Curves]], path: str | os.PathLike,
                  other: Mapping[str, Sequence[Curves]] | None = None,
                  title: str | None = None, key: str = DEFAULT_KEY, logy: bool = False) -> str:
    """The tutorial's figure: an Adam learning-rate sweep against other optimizer(s).

    Left: the seed-averaged training curve for each learning rate (viridis, low to high)
    and each `other` optimizer (black, thick). Right: the final (blue) and mean (orange)
    training loss against the learning rate on a log axis, with each `other` optimizer
    as horizontal lines in the same colours; diverged learning rates get a red cross.

    Args:
      curves_for_lr: Adam learning rate -> one curves dict per seed.
      path: output PNG path (parent folders are created).
      other: label -> curves dicts per seed of the optimizer(s) to compare with.
      title: optional figure title.
      key: which curve to plot.
      logy: log-scale loss axes.

    Returns:
      The path written.

    Example:
        >>> plot_lr_sweep(curves_for_lr, "sweep.png", other={"learned (PES)": lopt_curves})
        'sweep.png'
    """
    if not curves_for_lr:
        raise ValueError("plot_lr_sweep needs at least one learning rate")
    import matplotlib

    fig = _figure(figsize=(15, 5))
    left, right = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    lrs = sorted(curves_for_lr)
    means = []
    for i, lr in enumerate(lrs):
        xs, mean = _mean_curve(curves_for_lr[lr], key)
        diverged = " (diverged)" if not np.isfinite(mean[-1]) else ""
        left.plot(xs, mean, color=cmap(i / max(len(lrs) - 1, 1)), label=f"Adam lr={lr:g}{diverged}")
        means.append(mean)
    summaries = [summarize_curves(curves_for_lr[lr], key) for lr in lrs]
    right.semilogx(lrs, [s["final_train_loss"] for s in summaries], "o-", color="C0",
                   label="Adam last loss")
    right.semilogx(lrs, [s["mean_train_loss"] for s in summaries], "o-", color="C1",
                   label="Adam mean loss")
    for j, (label, curves) in enumerate((other or {}).items()):
        style = ["-", "--", ":", "-."][j % 4]
        xs, mean = _mean_curve(curves, key)
        left.plot(xs, mean, color="k", lw=3, ls=style, label=label)
        means.append(mean)
        s = summarize_curves(curves, key)
        right.axhline(s["final_train_loss"], color="C0", ls=style, lw=2, label=f"{label} last loss")
        right.axhline(s["mean_train_loss"], color="C1", ls=style, lw=2, label=f"{label} mean loss")
    _finish_axis(left, "training iteration", "training loss", logy)
    _clip_ylim(left, means, logy)
    _clip_ylim(right, means, logy)
    # semilogx silently drops NaN/inf: mark diverged learning rates at the top instead.
    bad = [lr for lr, s in zip(lrs, summaries, strict=True) if not math.isfinite(s["final_train_loss"])]
    if bad:
        right.plot(bad, [0.95] * len(bad), "x", color="r", ms=10, label="diverged",
                   transform=right.get_xaxis_transform())  # x: data, y: axes fraction
    _finish_axis(right, "learning rate", "training loss", logy)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _finish_axis(ax, xlabel: str, ylabel: str, logy: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
