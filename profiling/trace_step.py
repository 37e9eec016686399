"""Capture a `jax.profiler` trace of one AdafacMLPLOpt step and print per-kernel times.

    python profiling/trace_step.py                         # reference, CPU-friendly size
    python profiling/trace_step.py --backend pallas --params 1e7 --logdir /tmp/lopt_trace
    python profiling/trace_step.py --backend triton --tasks 64   # T tasks x the small convnet

The step is jitted, compiled and warmed up, then `--steps` steps run under
`jax.profiler.trace(logdir)`. The trace (`*.trace.json.gz` under logdir, also readable
in Perfetto / TensorBoard) is parsed and device / XLA-op events are grouped by name:
named `pallas_call`s (adafac_row_col_sums, adafac_moments, adafac_apply,
adafac_packed_*) appear under their names on GPU, and `jax.named_scope`s
(adafac_leaf_<i>, adafac_fused_leaf_<i>, adafac_apply, ...) label the XLA ops of the
reference and of the wrapper. With `--tasks T` the step is T vmapped tasks with per-task
theta x the small convnet of `benchmarks/step.py` (the meta-training shape).

It also prints the step's wall time, untraced (back to back, and one synchronised call
at a time as `benchmarks/step.py` times it), against the time the device spent in
kernels per step and their count: where wall time exceeds busy time, the step waits
on launches, not on memory or arithmetic.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from lopt_fast.learned import AdafacMLPLOpt


def _events(logdir):
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {logdir}")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return files[-1], [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]


def _is_kernel_event(e, pids):
    """Device or XLA-op events (not Python / runtime bookkeeping)."""
    name = e.get("name", "")
    if e.get("pid") in pids:
        return True
    args = e.get("args", {})
    return "hlo_op" in args or "long_name" in args or name.startswith(("adafac", "fusion"))


# On a GPU a jax-triton launch shows up under its kernel function's name, not the `name=`
# it was launched with (a pallas_call shows up under its name).
TRITON_KERNELS = {
    "_row_col_sums_kernel": "adafac_row_col_sums",
    "_factored_moments_kernel": "adafac_moments",
    "_factored_apply_kernel": "adafac_apply",
    "_factored_apply_persistent_kernel": "adafac_apply",
    "_packed_moments_kernel": "adafac_packed_moments",
    "_packed_apply_kernel": "adafac_packed_apply",
}


def scope_of(name: str, scopes: dict[str, str]) -> str:
    """The named scope or launch an event belongs to."""
    if name in scopes:
        return scopes[name]
    if name.startswith("adafac"):
        return name
    return TRITON_KERNELS.get(name, "(other)")


def scope_of_ops(compiled_text: str) -> dict[str, str]:
    """HLO instruction name -> its `adafac*` named scope (from op_name metadata)."""
    out = {}
    for m in re.finditer(r"%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", compiled_text):
        # Under vmap a scope reads "vmap(adafac_fused_leaf_3)".
        scopes = re.findall(r"adafac_\w+", m.group(2))
        out[m.group(1)] = "/".join(scopes[:2]) if scopes else "(other)"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--params", type=float, default=1e6)
    ap.add_argument("--tasks", type=int, default=0,
                    help="T > 0: T vmapped tasks x the small convnet instead of --params")
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--logdir", default="/tmp/lopt_fast_trace")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    lopt = AdafacMLPLOpt(hidden_size=args.hidden_size)
    step, state, grad, workload = _workload(lopt, args)
    scopes = scope_of_ops(step.lower(state, grad).compile().as_text())
    for _ in range(2):  # compile, and again if the first output's types differ (weak types)
        state = jax.block_until_ready(step(state, grad))
    wall = _wall_times(step, state, grad, repeats=max(10, args.steps))

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA / device events only
    with jax.profiler.trace(args.logdir, profiler_options=options):
        for i in range(args.steps):
            with jax.profiler.StepTraceAnnotation("lopt_step", step_num=i):
                state = step(state, grad)
        jax.block_until_ready(state)

    path, events = _events(args.logdir)
    pids = set()
    for e in events:
        if "/device:" in str(e.get("args", {}).get("device", "")):
            pids.add(e.get("pid"))
    totals, counts = collections.defaultdict(float), collections.Counter()
    for e in events:
        if _is_kernel_event(e, pids):
            totals[e["name"]] += e.get("dur", 0.0)
            counts[e["name"]] += 1
    by_scope = collections.defaultdict(float)
    for name, us in totals.items():
        by_scope[scope_of(name, scopes)] += us
    device_events = [e for e in events if e.get("pid") in pids]
    print(f"trace: {path}")
    print(f"backend {args.backend}, {workload}, {args.steps} steps on "
          f"{jax.devices()[0].device_kind}")
    print(f"wall ms/step: {wall[0] * 1e3:.3f} back to back, {wall[1] * 1e3:.3f} one synchronised "
          f"call at a time (untraced, median)")
    if device_events:
        busy = sum(e.get("dur", 0.0) for e in device_events) / args.steps
        print(f"device busy ms/step: {busy / 1e3:.3f} in {len(device_events) // args.steps} "
              f"device events per step")
    total = sum(totals.values()) or 1.0
    print(f"{'named scope / pallas_call':60s} {'ms/step':>9s} {'%':>6s}")
    for name, us in sorted(by_scope.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name[:60]:60s} {us / args.steps / 1e3:9.3f} {100 * us / total:6.1f}")
    print()
    print(f"{'kernel / op':60s} {'calls':>6s} {'ms/step':>9s} {'%':>6s}")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name[:60]:60s} {counts[name] // args.steps:6d} {us / args.steps / 1e3:9.3f} "
              f"{100 * us / total:6.1f}")


def _workload(lopt, args):
    """(jitted step(state, grad) -> state, state, grad, description)."""
    theta = lopt.init(jax.random.key(0))
    if not args.tasks:
        opt = lopt.opt_fn(theta, backend=args.backend, in_place=False)  # not donated
        side = int(round(args.params ** 0.5))
        params = {"w": 0.1 * jax.random.normal(jax.random.key(1), (side, side)),
                  "b": jnp.full((side,), 0.01)}
        grad = jax.tree.map(lambda x: jnp.cos(x * 7.0), params)
        return (jax.jit(opt.update), opt.init(params, num_steps=1000), grad,
                f"{side * side + side:,} params")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "benchmarks"))
    from step import CONV_MODEL, lopt_step  # benchmarks/step.py: the step it times

    # Per-task theta, state not donated (so fresh outputs), as step.py runs it.
    fn, (state,), (grad, thetas) = lopt_step(lopt, args.backend, CONV_MODEL, args.tasks)
    step = jax.jit(lambda s, g: fn(s, g, thetas)[0])
    n = sum(x.size for x in jax.tree.leaves(state.params))
    return step, state, grad, f"{args.tasks} tasks x the small convnet ({n:,} params)"


def _wall_times(step, state, grad, repeats: int) -> tuple[float, float]:
    """Median seconds per step: `repeats` steps back to back (one sync at the end), and one
    synchronised call at a time."""
    back_to_back, single = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        s = state
        for _ in range(repeats):
            s = step(s, grad)
        jax.block_until_ready(s)
        back_to_back.append((time.perf_counter() - t0) / repeats)
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, grad))
        single.append(time.perf_counter() - t0)
    return sorted(back_to_back)[1], sorted(single)[len(single) // 2]


if __name__ == "__main__":
    main()
