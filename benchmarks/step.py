"""Time one optimizer step: AdafacMLPLOpt backends (reference / pallas / triton) vs optax.adam.

    python benchmarks/step.py                       # CPU defaults: 1e5, 1e6; tasks 8
    python benchmarks/step.py --sizes 1e7 1e8 --tasks 8 16 32 64 --backends reference pallas triton
    python benchmarks/step.py --json out.json --repeats 20 --hidden-size 32
    python benchmarks/step.py --donate               # state updated in place, as in training
    python benchmarks/step.py --backends pallas --mlp-precision tf32 tf32_fp16 bf16
    python benchmarks/step.py --sizes 1e7 1e8 --tasks 64 --pick out/pick.json

Workloads:
  * one model of N parameters: a square matrix plus its bias (N = 1e5 ... 1e8);
  * the meta-training shape: T tasks x the small conv model (3x3 convs 3->32->64->64
    plus a 64x10 head, 56,970 parameters), vmapped over tasks with per-task theta.
Method: jit, one compile call and one warm-up excluded, `block_until_ready`, median and
IQR of `--repeats`. Ceilings measured in the same run: a large elementwise copy
(bytes read + written per second) and a large float32 matmul (FLOP/s). For each row:
achieved GB/s and GFLOP/s against the floor counts per parameter (AdafacMLP: 72 B of
float32 traffic and 2 (39 H + H^2 + 2 H) FLOP; Adam: 28 B, ~12 FLOP), the floor time
max(bytes / copy rate, FLOP / matmul rate) and time / adam in the same run.
Unavailable backends are skipped with a note; pallas on CPU (interpreter) only when asked.
With --donate every step (Adam's too) donates its state and is called on its previous
output, as a training loop does, and the fused kernels update it in place; without it
they write fresh outputs (`opt_fn(..., in_place=False)`), since updating a state that is
not donated in place makes XLA copy it first (`lopt_fast.pallas.plan.in_place_aliases`).
With --pick (`pick_default.py --json`: each kernel backend's pick from the tile sweeps, or
null) a row "<backend> pick" times that configuration next to the backend's default in the
same run: on the one-matrix workloads as swept (`sweep_options.update_options`), on the
tasks workloads its kernel form with the library's tiles (`sweep_options.form_options`:
the sweeps timed tiles on one matrix only). `pick_default.py --step` reads these rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sweep_options import TILE_KEYS, form_options, update_options  # benchmarks/ (scripts)
from timing import median_and_iqr, threaded_median_and_iqr

from lopt_fast.backends import BackendUnavailableError, _platform, resolve_backend
from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.pallas.blocks import MLP_PRECISIONS

CONV_MODEL = {
    "conv1": {"w": (3, 3, 3, 32), "b": (32,)},
    "conv2": {"w": (3, 3, 32, 64), "b": (64,)},
    "conv3": {"w": (3, 3, 64, 64), "b": (64,)},
    "head": {"w": (64, 10), "b": (10,)},
}


def ceilings(small: bool, repeats: int):
    n = (1 << 24) if small else (1 << 28)
    # Donated input: the output reuses the buffer, so no fresh pages are faulted in.
    # Several copies per timed sample, one sync: a sync per copy would count launch and
    # sync gaps as copy time (on an H100 that read 1.9-2.4 TB/s, below Adam's 2.2).
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = scale(jnp.full((n,), 1.5, jnp.float32))
    per_sample, times = 10, []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            x = scale(x)
        x = jax.block_until_ready(x)
        times.append((time.perf_counter() - t0) / per_sample)
    copy_gbs = 2 * 4 * n / statistics.median(times[2:]) / 1e9
    m = 2048 if small else 8192
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
    t, _ = median_and_iqr(jax.jit(lambda a: a @ a), a, repeats=max(3, repeats // 3))
    return {"copy_GBps": copy_gbs, "matmul_GFLOPs": 2 * m**3 / t / 1e9}


# The floor counts per parameter (module docstring): float32 bytes moved and FLOPs.
LOPT_BYTES, ADAM_BYTES, ADAM_FLOP = 72, 28, 12


def lopt_flop(hidden_size: int) -> int:
    h = hidden_size
    return 2 * (39 * h + h * h + 2 * h)


def floor_seconds(nparams: int, bytes_per_param: int, flop_per_param: int, ceil: dict) -> float:
    """The binding floor: the longer of moving the bytes at the copy rate and doing the
    FLOPs at the matmul rate (`ceilings`)."""
    return max(bytes_per_param * nparams / (ceil["copy_GBps"] * 1e9),
               flop_per_param * nparams / (ceil["matmul_GFLOPs"] * 1e9))


def model_shapes(n: int):
    side = max(2, int(round(n ** 0.5)))
    return {"w": (side, side), "b": (side,)}


def random_tree(shapes, key, lead=()):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, lead + s)
                                        for k, s in zip(keys, leaves, strict=True)])


# Each step builder returns (jitted fn, carry, rest): fn(*carry, *rest) -> the next carry
# (a tuple), with the carry donated when asked.

def lopt_step(lopt, backend, shapes, tasks, donate=False, mlp_precision=None,
              kernel_options=None):
    theta = lopt.init(jax.random.key(0))
    options = dict(backend=backend, in_place=donate, mlp_precision=mlp_precision,
                   kernel_options=kernel_options)
    opt = lopt.opt_fn(theta, **options)
    lead = () if tasks is None else (tasks,)
    params = random_tree(shapes, jax.random.key(1), lead)
    grad = random_tree(shapes, jax.random.key(2), lead)
    if tasks is None:
        state = opt.init(params, num_steps=1000)
        update, extra = opt.update, ()
    else:
        state = jax.vmap(lambda p: opt.init(p, num_steps=1000))(params)

        def update(s, g, thetas):  # per-task theta, as PES perturbs it
            one = lambda th, s, g: lopt.opt_fn(th, **options).update(s, g)  # noqa: E731
            return jax.vmap(one)(thetas, s, g)

        extra = (jax.tree.map(lambda x: jnp.stack([x + 0.01 * i for i in range(tasks)]), theta),)
    fn = jax.jit(lambda s, g, *x: (update(s, g, *x),), donate_argnums=0 if donate else ())
    return fn, (state,), (grad, *extra)


def adam_step(shapes, tasks, donate=False):
    tx = optax.adam(1e-3)
    lead = () if tasks is None else (tasks,)
    params = random_tree(shapes, jax.random.key(1), lead)
    grad = random_tree(shapes, jax.random.key(2), lead)
    init = tx.init if tasks is None else jax.vmap(tx.init)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    fn = jax.jit(step if tasks is None else jax.vmap(step), donate_argnums=(0, 1) if donate else ())
    return fn, (params, init(params)), (grad,)


def time_step(built, repeats: int, donate: bool):
    fn, carry, rest = built
    if donate:
        return threaded_median_and_iqr(fn, carry, rest, repeats=repeats)
    return median_and_iqr(fn, *carry, *rest, repeats=repeats)


def main(argv=None):
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=float, default=[1e5, 1e6] if on_cpu else
                    [1e5, 1e6, 1e7, 1e8])
    ap.add_argument("--tasks", nargs="*", type=int, default=[8] if on_cpu else [8, 16, 32, 64])
    ap.add_argument("--backends", nargs="*", default=["reference", "pallas", "triton"])
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10 if on_cpu else 30)
    ap.add_argument("--json", default="step_benchmark.json")
    ap.add_argument("--donate", action="store_true",
                    help="donate the state and call each step on its output (in place)")
    ap.add_argument("--mlp-precision", nargs="*", choices=("default", *MLP_PRECISIONS),
                    default=["default"],
                    help="the kernel backends' dot operands, a row each (named after the "
                         "backend and, unless 'default', the backend's own default, the "
                         "precision); the reference has one")
    ap.add_argument("--pick", default=None,
                    help="pick_default.py's JSON: also time each kernel backend's pick "
                         "(rows '<backend> pick')")
    args = ap.parse_args(argv)

    notes = []
    backends = []
    for b in args.backends:
        if b == "pallas" and on_cpu and "pallas" not in (argv or []) and args.backends == \
                ["reference", "pallas", "triton"]:
            notes.append("pallas skipped on CPU by default (interpreter; pass --backends pallas)")
            continue
        try:
            resolve_backend(b)
            backends.append(b)
        except BackendUnavailableError as e:
            notes.append(f"{b} skipped: {e}")

    info = {"device": str(jax.devices()[0].device_kind), "platform": _platform(),
            "host": platform.processor() or platform.machine(), "jax": jax.__version__,
            "optax": optax.__version__, "numpy": np.__version__,
            "date": datetime.date.today().isoformat(), "hidden_size": args.hidden_size,
            "donate": args.donate, "mlp_precision": args.mlp_precision}
    picks = {}  # kernel backend: its pick's options (the sweep JSON's form)
    if args.pick:
        with open(args.pick) as f:
            info["pick"] = json.load(f)
        picks = {b: p["options"] for b, p in info["pick"].items() if p and b in backends}
        notes += [f"{b} pick on the tasks workloads: its kernel form with the library's tiles "
                  f"({', '.join(f'{k} {o[k]}' for k in TILE_KEYS if k in o)} swept on one "
                  "matrix)" for b, o in picks.items() if args.tasks]
    ceil = ceilings(on_cpu, args.repeats)
    h = args.hidden_size
    lopt = AdafacMLPLOpt(hidden_size=h)

    workloads = [(f"model {int(n):.0e}", model_shapes(int(n)), None) for n in args.sizes]
    workloads += [(f"{t} tasks x conv", CONV_MODEL, t) for t in args.tasks]
    rows = []
    for label, shapes, tasks in workloads:
        nparams = sum(int(np.prod(s)) for s in jax.tree.leaves(
            shapes, is_leaf=lambda x: isinstance(x, tuple))) * (tasks or 1)
        t_adam, iqr = time_step(adam_step(shapes, tasks, args.donate), args.repeats, args.donate)
        entries = [("optax.adam", t_adam, iqr, ADAM_BYTES, ADAM_FLOP)]
        for b in backends:
            for prec in ["default"] if b == "reference" else args.mlp_precision:
                default = prec == "default"
                t, iqr = time_step(lopt_step(lopt, b, shapes, tasks, args.donate,
                                             None if default else prec),
                                   args.repeats, args.donate)
                entries.append((b if default else f"{b} {prec}", t, iqr, LOPT_BYTES,
                                lopt_flop(h)))
            if b in picks:
                options = (form_options(picks[b]) if tasks else
                           update_options(picks[b], max(shapes.values(), key=len)))
                built = lopt_step(lopt, b, shapes, tasks, args.donate,
                                  options.pop("mlp_precision", None), options)
                t, iqr = time_step(built, args.repeats, args.donate)
                entries.append((f"{b} pick", t, iqr, LOPT_BYTES, lopt_flop(h)))
        for name, t, iqr, bpp, fpp in entries:
            floor = floor_seconds(nparams, bpp, fpp, ceil)
            rows.append({"workload": label, "params": nparams, "backend": name, "ms": t * 1e3,
                         "iqr_ms": iqr * 1e3, "GBps": bpp * nparams / t / 1e9,
                         "GFLOPs": fpp * nparams / t / 1e9, "pct_of_floor": 100 * floor / t,
                         "x_adam": t / t_adam})

    print(f"device: {info['device']} ({info['platform']}), jax {info['jax']}, optax "
          f"{info['optax']}, {info['date']}, H={h}, state {'donated' if args.donate else 'not donated'}")
    print(f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, matmul {ceil['matmul_GFLOPs']:.1f} GFLOP/s")
    for n in notes:
        print("note:", n)
    hdr = ("workload", "params", "backend", "ms", "iqr ms", "GB/s", "GFLOP/s", "% floor", "x adam")
    print("| " + " | ".join(hdr) + " |")
    print("|" + " --- |" * 2 + " --- |" + " ---: |" * 6)
    for r in rows:
        print(f"| {r['workload']} | {r['params']:,} | {r['backend']} | {r['ms']:.3f} | "
              f"{r['iqr_ms']:.3f} | {r['GBps']:.1f} | {r['GFLOPs']:.1f} | "
              f"{r['pct_of_floor']:.1f} | {r['x_adam']:.1f} |")
    with open(args.json, "w") as f:
        json.dump({"info": info, "ceilings": ceil, "notes": notes, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
