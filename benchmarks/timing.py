"""The one timing rule of the benchmarks: compile and warm up, then time repeats."""

from __future__ import annotations

import statistics
import time

import jax


def median_and_iqr(fn, *args, repeats: int) -> tuple[float, float]:
    """Median and interquartile range (seconds) of `fn(*args)` over `repeats` calls.

    The first call (compile) and a second (warm-up) are excluded; every call is
    waited for with `block_until_ready`.
    """
    return interleaved_median_and_iqr({"": (fn, args)}, repeats)[""]


def _median_and_iqr(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def interleaved_median_and_iqr(calls: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """`median_and_iqr` for several `name: (fn, args)` calls timed in turn, one call of
    each per round, so a slow spell of a shared machine hits all of them alike and
    their ratios stay meaningful."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))  # warm-up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: _median_and_iqr(ts) for name, ts in times.items()}


def threaded_median_and_iqr(fn, carry: tuple, rest: tuple, repeats: int) -> tuple[float, float]:
    """`median_and_iqr` for a step `fn(*carry, *rest) -> new carry (a tuple)` that is called
    on its own output, so it may donate (update in place) its carry: a donated buffer cannot
    be passed twice. Two calls (compile, warm-up) are excluded, as above."""
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(fn(*carry, *rest))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return _median_and_iqr(times)
