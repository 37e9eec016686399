"""The meta-training loop: outer steps, progress bar, throughput, checkpoints, resume.

    result = meta_train(trainer, key, num_steps=1000, ckpt_path="runs/x/checkpoint.npz",
                        ckpt_every=100, config={...})

If `ckpt_path` exists, training resumes from it (after checking its stored config
equals `config`), so re-running a killed command loses at most `ckpt_every` steps.
Logging happens here, on the host, from the metrics the jitted step returns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lopt_fast.meta.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from lopt_fast.meta.outer_trainer import MetaTrainState, OuterTrainer


class ConfigMismatchError(ValueError):
    """The checkpoint to resume from was written by a different configuration."""


@dataclasses.dataclass
class MetaTrainResult:
    """What `meta_train` returns.

    Attributes:
      state: the final `MetaTrainState`.
      history: per outer step, the metrics (floats) of the steps run in this call.
      resumed_from: outer step the run resumed from (0 for a fresh start).
      seconds: wall time of the steps after the first (compilation excluded).
      timed_steps: number of outer steps in `seconds`.
      inner_steps_per_update: inner steps x tasks per outer step.
    """

    state: MetaTrainState
    history: list[dict[str, float]]
    resumed_from: int
    seconds: float
    timed_steps: int
    inner_steps_per_update: int

    @property
    def outer_steps_per_s(self) -> float:
        return self.timed_steps / self.seconds if self.seconds > 0 else float("nan")

    @property
    def inner_steps_per_s(self) -> float:
        """Inner steps x tasks per second (antithetic halves counted)."""
        return self.outer_steps_per_s * self.inner_steps_per_update


def meta_train(trainer: OuterTrainer, key: jax.Array, num_steps: int, *,
               theta: Any = None, ckpt_path: str | os.PathLike | None = None,
               ckpt_every: int = 100, config: dict | None = None, progress: bool = True,
               desc: str = "meta-train",
               on_step: Callable[[int, dict[str, float]], None] | None = None) -> MetaTrainResult:
    """Run outer steps until `state.step == num_steps`, checkpointing every `ckpt_every`.

    Args:
      trainer: the outer trainer.
      key: PRNG key of a fresh start (ignored when resuming).
      num_steps: total outer steps (including those done before a resume).
      theta: initial theta of a fresh start (default: random from the truncated step).
      ckpt_path: checkpoint file; resumed from when it exists. None: no checkpoints.
      ckpt_every: save every this many outer steps (and at the end).
      config: JSON-able description of the run, stored with checkpoints and compared
        on resume.
      progress: show a tqdm progress bar.
      desc: progress bar label.
      on_step: called on the host after every step with (step, metrics).
    """
    if int(ckpt_every) < 1:
        raise ValueError(f"ckpt_every must be >= 1, got {ckpt_every}")
    state = trainer.init(key, theta)
    resumed_from = 0
    if ckpt_path is not None and os.path.exists(ckpt_path):
        stored = checkpoint_config(ckpt_path)
        if config is not None and stored != _jsonable(config):
            diff = sorted(k for k in set(stored) | set(config)
                          if stored.get(k) != _jsonable(config).get(k))
            raise ConfigMismatchError(
                f"checkpoint {os.fspath(ckpt_path)!r} was written with different settings "
                f"({', '.join(diff)}); use another output folder or the same flags")
        state = load_checkpoint(ckpt_path, state)
        resumed_from = int(state.step)

    history: list[dict[str, float]] = []
    start = int(state.step)
    todo = max(int(num_steps) - start, 0)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(num_steps), initial=start, desc=desc, dynamic_ncols=True)
    t0, timed = None, 0
    for _ in range(todo):
        state, metrics = trainer.update(state)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step = int(state.step)
        history.append({"step": step, **metrics})
        if t0 is None:
            t0 = time.perf_counter()  # the first step includes compilation
        else:
            timed += 1
        if on_step is not None:
            on_step(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if ckpt_path is not None and (step % ckpt_every == 0 or step == num_steps):
            save_checkpoint(ckpt_path, state, _jsonable(config))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    return MetaTrainResult(state=state, history=history, resumed_from=resumed_from,
                           seconds=seconds, timed_steps=timed,
                           inner_steps_per_update=trainer.inner_steps_per_update())


def _jsonable(config: dict | None) -> dict:
    import json

    return json.loads(json.dumps(config or {}, sort_keys=True, default=_default))


def _default(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
