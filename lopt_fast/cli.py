"""`lopt-fast`: the command line (demo, meta-train, eval, bench).

    lopt-fast demo --out runs/demo          # Adam sweep -> PES meta-training -> eval
    lopt-fast meta-train --task digits_mlp --out runs/pes --outer-steps 2000
    lopt-fast eval --theta runs/pes/theta.npz --out runs/eval
    lopt-fast bench --num-tasks 32 --trunc-length 10

Bad arguments (unknown task, bad values, missing files or data) print one line
`lopt-fast: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

DEFAULT_TASK = "digits_mlp"
DEMO_ADAM_LRS = (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 5e-2, 1e-1)


class UsageError(Exception):
    """A problem with the command's arguments or inputs: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"lopt-fast: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# -- argument types ----------------------------------------------------------------------


def _checked(convert, valid, expected: str):
    """An argparse type: `convert(text)`, rejected with "expected ..." unless `valid`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


# -- shared helpers ----------------------------------------------------------------------


def _load_task(name: str, synthetic_data: bool = False):
    from lopt_fast.tasks import registry

    if name not in registry.TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(sorted(registry.TASKS))}")
    if synthetic_data and not registry.task_class(name).supports_synthetic_data:
        with_synthetic = [t for t in registry.TASKS if registry.task_class(t).supports_synthetic_data]
        raise UsageError(f"--synthetic-data is for tasks that read external data "
                         f"({', '.join(with_synthetic)}); {name!r} ships its data")
    try:
        task = registry.get_task(name, **({"synthetic": True} if synthetic_data else {}))
        _ = task.datasets  # data loads lazily: surface a missing data set here, as one line
        return task
    except (FileNotFoundError, ImportError, OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"task {name!r} cannot be loaded: {e}") from None


def _check_backend(backend: str) -> None:
    from lopt_fast.backends import BackendUnavailableError, resolve_backend

    try:
        resolve_backend(backend)
    except (BackendUnavailableError, ValueError) as e:
        raise UsageError(str(e)) from None


def _make_lopt(hidden_size: int):
    from lopt_fast.learned import AdafacMLPLOpt

    return AdafacMLPLOpt(hidden_size=hidden_size)


def _make_trainer(args, task, lopt, *, estimator: str = "pes"):
    import optax

    from lopt_fast import meta

    if getattr(args, "schedule", "constant") == "log-uniform":
        sched = meta.LogUniformLengthSchedule(args.min_length, args.inner_steps)
    else:
        sched = meta.ConstantTruncationSchedule(args.inner_steps)
    step = meta.VectorizedLOptTruncatedStep(
        task, lopt, sched, args.num_tasks, random_initial_iteration_offset=args.inner_steps,
        meta_loss_split=getattr(args, "meta_loss_split", None), backend=args.backend,
        mlp_precision=args.mlp_precision)
    std = getattr(args, "std", 0.01)
    if estimator == "pes":
        est = meta.TruncatedPES(step, args.trunc_length, std=std)
    elif estimator == "es":
        est = meta.TruncatedES(step, args.trunc_length, std=std)
    else:
        est = meta.TruncatedGrad(step, args.trunc_length)
    mesh = None
    if getattr(args, "devices", "all") == "all":
        import jax

        if jax.device_count() > 1:
            if args.num_tasks % jax.device_count():
                raise UsageError(f"--num-tasks {args.num_tasks} must be a multiple of the "
                                 f"{jax.device_count()} devices (or pass --devices 1)")
            mesh = meta.task_mesh()
    outer = meta.default_outer_optimizer(args.outer_lr)
    if getattr(args, "outer_lr_decay", False):
        sched_lr = optax.cosine_decay_schedule(args.outer_lr, args.outer_steps, alpha=0.1)
        outer = optax.chain(optax.clip(3.0), optax.adam(sched_lr))
    return meta.OuterTrainer([est], outer, mesh=mesh)


def _throughput_line(result) -> str:
    return (f"meta-training throughput: {result.inner_steps_per_s:,.0f} inner steps x tasks/s, "
            f"{result.outer_steps_per_s:.2f} outer steps/s "
            f"({result.inner_steps_per_update} inner steps x tasks per outer step, "
            f"{result.timed_steps} timed steps, compilation excluded)")


def _curves(task, opt, num_steps, key, eval_every):
    from lopt_fast.eval import single_task_training_curves

    return single_task_training_curves(task, opt, num_steps=num_steps, key=key,
                                       eval_every=eval_every, eval_batches=5,
                                       last_eval_batches=10, progress=False)


def _to_jsonable(tree: Any) -> Any:
    import numpy as np

    if isinstance(tree, dict):
        return {str(k): _to_jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_to_jsonable(v) for v in tree]
    arr = np.asarray(tree)
    return arr.tolist() if arr.ndim else arr.item()


def _loss_stats(curves: list[dict]) -> tuple[float, float]:
    """(mean over the run, final) training loss, averaged over seeds (as the tutorial)."""
    from lopt_fast.eval import summarize_curves

    summary = summarize_curves(curves)
    return summary["mean_train_loss"], summary["final_train_loss"]


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _run_config(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}


# -- commands ----------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    import jax
    from tqdm.auto import tqdm

    from lopt_fast import meta
    from lopt_fast.eval import best_lr as eval_best_lr
    from lopt_fast.eval import plot_lr_sweep
    from lopt_fast.learned import save_theta
    from lopt_fast.optimizers import Adam

    task = _load_task(args.task)
    _check_backend(args.backend)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    progress = not args.no_progress
    print(f"lopt-fast demo: task={args.task} inner_steps={args.inner_steps} "
          f"num_tasks={args.num_tasks} trunc_length={args.trunc_length} "
          f"outer_steps={args.outer_steps} outer_lr={args.outer_lr:g} out={args.out}")

    # 1. Adam learning-rate sweep, several seeds each.
    sweep: dict[float, list[dict]] = {}
    jobs = [(lr, s) for lr in args.adam_lrs for s in range(args.adam_seeds)]
    adams = {lr: Adam(lr) for lr in args.adam_lrs}  # one object per lr: seeds reuse its compile
    for lr, s in tqdm(jobs, desc="Adam sweep", disable=not progress, dynamic_ncols=True):
        key = jax.random.fold_in(jax.random.key(args.seed), s)
        sweep.setdefault(lr, []).append(
            _curves(task, adams[lr], args.inner_steps, key, args.eval_every))
    adam_stats = {lr: _loss_stats(c) for lr, c in sweep.items()}
    best_lr = eval_best_lr(sweep, metric="mean")
    print(f"best Adam lr (mean train loss over {args.inner_steps} steps): {best_lr:g} "
          f"mean={adam_stats[best_lr][0]:.4f} final={adam_stats[best_lr][1]:.4f}")

    # 2. PES meta-training of AdafacMLPLOpt(hidden_size=32).
    lopt = _make_lopt(args.hidden_size)
    trainer = _make_trainer(args, task, lopt)
    config = _run_config(args, ["task", "inner_steps", "num_tasks", "trunc_length",
                                "outer_steps", "outer_lr", "seed", "hidden_size", "backend"])
    result = meta.meta_train(trainer, jax.random.key(args.seed + 1), args.outer_steps,
                             ckpt_path=os.path.join(args.out, "checkpoint.npz"),
                             ckpt_every=args.ckpt_every, config=config, progress=progress,
                             desc="PES meta-training")
    if result.resumed_from:
        print(f"resumed from checkpoint at outer step {result.resumed_from}")
    if result.timed_steps:
        print(_throughput_line(result))
    theta = jax.device_get(result.state.theta)
    save_theta(os.path.join(args.out, "theta.npz"), theta)

    # 3. The learned optimizer on held-out seeds.
    opt = lopt.opt_fn(theta, backend=args.backend, mlp_precision=args.mlp_precision)
    lopt_curves = [
        _curves(task, opt, args.inner_steps,
                jax.random.fold_in(jax.random.key(args.seed + 10_000), s), args.eval_every)
        for s in tqdm(range(args.eval_seeds), desc="eval learned", disable=not progress,
                      dynamic_ncols=True)]
    lopt_mean, lopt_final = _loss_stats(lopt_curves)

    # 4. Outputs: curves JSON, figure, summary table.
    _write_json(os.path.join(args.out, "curves.json"), {
        "config": config,
        "adam": {f"{lr:g}": _to_jsonable(c) for lr, c in sweep.items()},
        "learned": _to_jsonable(lopt_curves),
        "meta_training": [{k: v for k, v in h.items()} for h in result.history],
    })
    plot_lr_sweep(sweep, os.path.join(args.out, "demo.png"),
                  other={"learned (PES)": lopt_curves},
                  title=f"{args.task}: Adam sweep vs learned optimizer (held-out seeds)")
    b_mean, b_final = adam_stats[best_lr]
    wins = lopt_mean < b_mean
    rows = [("learned (PES, AdafacMLPLOpt h=32)", lopt_mean, lopt_final),
            (f"best Adam (lr={best_lr:g})", b_mean, b_final)]
    table = ["| optimizer | mean train loss | final train loss |", "| --- | --- | --- |"]
    table += [f"| {n} | {m:.4f} | {f:.4f} |" for n, m, f in rows]
    elapsed = time.perf_counter() - t_start
    summary = "\n".join([
        f"# lopt-fast demo: {args.task}, {args.inner_steps} inner steps",
        "",
        f"Held-out seeds: {args.eval_seeds} for the learned optimizer; Adam: {args.adam_seeds} "
        f"seeds per learning rate ({', '.join(f'{lr:g}' for lr in args.adam_lrs)}).",
        "",
        *table,
        "",
        f"Learned optimizer {'beats' if wins else 'does not beat'} the best Adam learning "
        f"rate on mean training loss ({lopt_mean:.4f} vs {b_mean:.4f}).",
        "",
        f"Meta-training: {args.outer_steps} outer steps of PES, {args.num_tasks} tasks x "
        f"truncations of {args.trunc_length}; "
        + (_throughput_line(result) if result.timed_steps else "no steps run (resumed)") + ".",
        f"Total demo time: {elapsed:.0f} s on {platform.machine()} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device(s)).",
        ""])
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print("\n".join(table))
    print(f"learned optimizer {'BEATS' if wins else 'does not beat'} best Adam on mean train loss;"
          f" wrote {args.out}/curves.json, demo.png, summary.md, theta.npz in {elapsed:.0f} s")
    return 0


def _cmd_meta_train(args) -> int:
    import jax

    from lopt_fast import meta
    from lopt_fast.learned import load_theta, save_theta

    task = _load_task(args.task)
    _check_backend(args.backend)
    if args.schedule == "log-uniform" and not 1 <= args.min_length <= args.inner_steps:
        raise UsageError(f"--min-length must be in [1, --inner-steps={args.inner_steps}], "
                         f"got {args.min_length}")
    lopt = _make_lopt(args.hidden_size)
    theta0 = None
    if args.init_theta:
        if not os.path.exists(args.init_theta):
            raise UsageError(f"--init-theta: no file {args.init_theta!r}")
        theta0 = load_theta(args.init_theta)
        try:
            lopt.check_theta(theta0)
        except ValueError as e:
            raise UsageError(f"--init-theta: {str(e).splitlines()[0]}") from None
    trainer = _make_trainer(args, task, lopt, estimator=args.estimator)
    config = _run_config(args, ["task", "estimator", "inner_steps", "num_tasks", "trunc_length",
                                "outer_lr", "std", "schedule", "min_length", "meta_loss_split",
                                "seed", "hidden_size", "init_theta"])
    os.makedirs(args.out, exist_ok=True)
    # Several processes (multi-host) share --out: process 0 writes, as checkpoints do.
    writer = jax.process_index() == 0
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if writer else None

    def on_step(step, metrics):
        if writer and (step % args.log_every == 0 or step == args.outer_steps):
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            log.flush()

    try:
        result = meta.meta_train(trainer, jax.random.key(args.seed), args.outer_steps,
                                 theta=theta0, ckpt_path=os.path.join(args.out, "checkpoint.npz"),
                                 ckpt_every=args.ckpt_every, config=config,
                                 progress=not args.no_progress, desc=f"{args.estimator} meta-train",
                                 on_step=on_step)
    except meta.ConfigMismatchError as e:
        raise UsageError(str(e)) from None
    finally:
        if log is not None:
            log.close()
    if result.resumed_from:
        print(f"resumed from checkpoint at outer step {result.resumed_from}")
    if result.timed_steps:
        print(_throughput_line(result))
    if writer:
        save_theta(os.path.join(args.out, "theta.npz"), jax.device_get(result.state.theta))
        print(f"wrote {args.out}/theta.npz (load with lopt_fast.load_theta), checkpoint.npz, "
              f"metrics.jsonl")
    return 0


def _cmd_eval(args) -> int:
    import jax

    from lopt_fast.learned import load_theta
    from lopt_fast.optimizers import Adam

    task = _load_task(args.task)
    _check_backend(args.backend)
    if (args.theta is None) == (args.adam is None):
        raise UsageError("pass exactly one of --theta PATH or --adam LR")
    if args.theta is not None:
        if not os.path.exists(args.theta):
            raise UsageError(f"--theta: no file {args.theta!r}")
        lopt = _make_lopt(args.hidden_size)
        theta = load_theta(args.theta)
        try:
            opt = lopt.opt_fn(theta, backend=args.backend, mlp_precision=args.mlp_precision)
        except ValueError as e:
            raise UsageError(f"--theta {args.theta!r}: {str(e).splitlines()[0]}") from None
        name = f"learned({args.theta})"
    else:
        opt, name = Adam(args.adam), f"Adam({args.adam:g})"
    curves = [_curves(task, opt, args.inner_steps,
                      jax.random.fold_in(jax.random.key(args.seed), s), args.eval_every)
              for s in range(args.seeds)]
    mean_l, final_l = _loss_stats(curves)
    print(f"{name} on {args.task}, {args.seeds} seeds x {args.inner_steps} steps: "
          f"mean train loss {mean_l:.4f}, final {final_l:.4f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        _write_json(os.path.join(args.out, "curves.json"),
                    {"optimizer": name, "task": args.task, "curves": _to_jsonable(curves),
                     "mean_train_loss": mean_l, "final_train_loss": final_l})
        print(f"wrote {args.out}/curves.json")
    return 0


def _cmd_bench(args) -> int:
    import jax

    from lopt_fast import meta

    task = _load_task(args.task, synthetic_data=args.synthetic_data)
    _check_backend(args.backend)
    trainer = _make_trainer(args, task, _make_lopt(args.hidden_size), estimator=args.estimator)
    result = meta.meta_train(trainer, jax.random.key(0), args.steps + 1, progress=False)
    dev = jax.devices()[0]
    data = " data=synthetic" if args.synthetic_data else ""
    print(f"task={args.task}{data} estimator={args.estimator} num_tasks={args.num_tasks} "
          f"trunc_length={args.trunc_length} devices={jax.device_count()}x{dev.platform} "
          f"({getattr(dev, 'device_kind', '')}) jax={jax.__version__}")
    print(_throughput_line(result))
    return 0


# -- parser ------------------------------------------------------------------------------


def _add_common(p, *, outer=True):
    from lopt_fast.pallas.blocks import MLP_PRECISIONS

    p.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK})")
    p.add_argument("--inner-steps", type=_positive_int, default=200,
                   help="length of each inner training run (the horizon)")
    p.add_argument("--backend", default="auto", help="auto | reference | pallas | triton")
    p.add_argument("--mlp-precision", choices=MLP_PRECISIONS, default=None,
                   help="the kernel backends' MLP dot operands (the reference ignores it): "
                        "tf32, tf32_fp16, bf16 or ieee; default: the backend's own (tf32)")
    p.add_argument("--hidden-size", type=_positive_int, default=32,
                   help="AdafacMLPLOpt hidden size")
    if outer:
        p.add_argument("--num-tasks", type=_positive_int, default=8,
                       help="inner problems per outer step (antithetic pairs: 2x)")
        p.add_argument("--trunc-length", type=_positive_int, default=10,
                       help="inner steps per truncation (per outer step)")
        p.add_argument("--devices", choices=("all", "1"), default="all",
                       help="shard tasks over all local devices, or use one")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lopt-fast", description="Fast learned optimizers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="Adam sweep -> PES meta-training -> eval (the main job)")
    _add_common(demo)
    # Defaults tuned to beat the best Adam lr on digits_mlp in < 10 min on 2 CPU cores.
    demo.set_defaults(inner_steps=100, num_tasks=8, trunc_length=10, outer_lr_decay=True)
    demo.add_argument("--outer-steps", type=_nonneg_int, default=1000)
    demo.add_argument("--outer-lr", type=_positive_float, default=1e-2,
                      help="outer Adam lr, cosine-decayed to 10%% over the run")
    demo.add_argument("--seed", type=_nonneg_int, default=0)
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--adam-lrs", type=_float_list, default=list(DEMO_ADAM_LRS),
                      help="comma-separated Adam learning rates")
    demo.add_argument("--adam-seeds", type=_positive_int, default=3, help="seeds per Adam lr")
    demo.add_argument("--eval-seeds", type=_positive_int, default=5,
                      help="held-out seeds for the learned optimizer")
    demo.add_argument("--eval-every", type=_positive_int, default=5)
    demo.add_argument("--ckpt-every", type=_positive_int, default=100)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    mt = sub.add_parser("meta-train", help="meta-train AdafacMLPLOpt (checkpoints, resume)")
    _add_common(mt)
    mt.add_argument("--estimator", choices=("pes", "es", "tbptt"), default="pes")
    mt.add_argument("--outer-steps", type=_nonneg_int, default=1000)
    mt.add_argument("--outer-lr", type=_positive_float, default=3e-3)
    mt.add_argument("--outer-lr-decay", action="store_true", help="cosine-decay the outer lr")
    mt.add_argument("--std", type=_positive_float, default=0.01, help="ES/PES perturbation std")
    mt.add_argument("--schedule", choices=("constant", "log-uniform"), default="constant")
    mt.add_argument("--min-length", type=_positive_int, default=10,
                    help="shortest run of the log-uniform schedule")
    mt.add_argument("--meta-loss-split", choices=("outer_valid", "inner_valid", "test"),
                    default=None, help="score each step on this split instead of the train batch")
    mt.add_argument("--init-theta", default=None, help="start from this theta file")
    mt.add_argument("--seed", type=_nonneg_int, default=0)
    mt.add_argument("--out", required=True, help="output folder (checkpoint, theta, metrics)")
    mt.add_argument("--ckpt-every", type=_positive_int, default=100)
    mt.add_argument("--log-every", type=_positive_int, default=10)
    mt.add_argument("--no-progress", action="store_true")
    mt.set_defaults(func=_cmd_meta_train)

    ev = sub.add_parser("eval", help="training curves of a theta (or Adam) on a task")
    _add_common(ev, outer=False)
    ev.add_argument("--theta", default=None, help="theta file from meta-train / demo")
    ev.add_argument("--adam", type=_positive_float, default=None, help="evaluate Adam(LR)")
    ev.add_argument("--seeds", type=_positive_int, default=5)
    ev.add_argument("--seed", type=_nonneg_int, default=10_000)
    ev.add_argument("--eval-every", type=_positive_int, default=5)
    ev.add_argument("--out", default=None, help="write curves.json here")
    ev.set_defaults(func=_cmd_eval)

    bench = sub.add_parser("bench", help="meta-training throughput")
    _add_common(bench)
    bench.set_defaults(num_tasks=32, inner_steps=200)
    bench.add_argument("--estimator", choices=("pes", "es", "tbptt"), default="pes")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed outer steps")
    bench.add_argument("--outer-lr", type=_positive_float, default=3e-3)
    bench.add_argument("--synthetic-data", action="store_true",
                       help="random data of the task's shapes (time cifar10_conv without CIFAR-10)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lopt-fast` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"lopt-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lopt-fast: interrupted (re-run the same command to resume from the last "
              "checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
