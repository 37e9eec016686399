"""Truncation schedules: how long each inner training run lasts before it is reset.

Same semantics as learned_optimization's `outer_trainers/truncation_schedule.py`: a
schedule has a small state (the current run's `length`); after every inner step
`next_state(state, step, key)` says whether the run is done (`step >= length`) and,
for random schedules, draws the next run's length when it is.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TruncationState:
    """The length (number of inner steps) of the current inner training run."""

    length: jax.Array  # int32 scalar


class TruncationSchedule:
    """Base class: `init(key) -> state` and `next_state(state, step, key) -> (state, done)`."""

    max_length: int

    def init(self, key: jax.Array) -> TruncationState:
        raise NotImplementedError

    def next_state(self, state: TruncationState, step: jax.Array,
                   key: jax.Array) -> tuple[TruncationState, jax.Array]:
        raise NotImplementedError


class ConstantTruncationSchedule(TruncationSchedule):
    """Every inner run lasts `total_length` steps.

    Example:
        sched = ConstantTruncationSchedule(200)
    """

    def __init__(self, total_length: int):
        if int(total_length) < 1:
            raise ValueError(f"total_length must be >= 1, got {total_length}")
        self.total_length = int(total_length)
        self.max_length = self.total_length

    def init(self, key: jax.Array) -> TruncationState:
        del key
        return TruncationState(length=jnp.asarray(self.total_length, jnp.int32))

    def next_state(self, state, step, key):
        del key
        return state, step >= state.length

    def __repr__(self) -> str:
        return f"ConstantTruncationSchedule({self.total_length})"


class LogUniformLengthSchedule(TruncationSchedule):
    """Run lengths drawn log-uniformly from [min_length, max_length): more short runs.

    Example:
        sched = LogUniformLengthSchedule(10, 1000)
    """

    def __init__(self, min_length: int, max_length: int):
        if not 1 <= int(min_length) <= int(max_length):
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        self.min_length = int(min_length)
        self.max_length = int(max_length)

    def init(self, key: jax.Array) -> TruncationState:
        log_len = jax.random.uniform(key, (), jnp.float32, np.log(self.min_length),
                                     np.log(self.max_length))
        return TruncationState(length=jnp.exp(log_len).astype(jnp.int32))

    def next_state(self, state, step, key):
        done = step >= state.length
        fresh = self.init(key)
        return jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, state), done

    def __repr__(self) -> str:
        return f"LogUniformLengthSchedule({self.min_length}, {self.max_length})"
