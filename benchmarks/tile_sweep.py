"""Time the fused step over factored-tile shapes and warps per program (GPU).

    python benchmarks/tile_sweep.py                                  # triton, 1e7 and 1e8
    python benchmarks/tile_sweep.py --tiles 1x256 2x128 --layer1 dot dot_all --precision tf32 bf16
    python benchmarks/tile_sweep.py --backend pallas --tiles 1x256 --layer1 dot dot_all --early-weights off on
    python benchmarks/tile_sweep.py --backend pallas --tiles 1x256 8x32 --tile-order rows columns
    python benchmarks/tile_sweep.py --layer1 dot_all --precision bf16 --persistent off on --stages 2 3

Each configuration overrides the apply tile of every factored tensor (`blocks=BlockSizes(
rows, cols, num_warps, num_stages)`) of a square matrix plus its bias, how the apply
kernel runs the first MLP layer (`layer1`), the dots' operands (`mlp_precision`) and, for
triton, whether it is the persistent kernel (`persistent`, its tile loop pipelined
`num_stages` deep), for pallas where the apply kernels read the MLP's biases and output
layer (`early_weights`) and the order of a tensor's tiles (`tile_order`,
`blocks.TILE_ORDERS`). An explicit tile is the apply pass's; the reduction passes keep the
library's tile (`reduction_block_sizes`, 4x bigger), or take the apply tile
(`--reduction-tiles same`, as every sweep before session 21 did) or another
(`--reduction-tiles 1x2048`). "default" is the library's choice: `blocks.block_sizes` for
the apply pass and `reduction_block_sizes` for the two reduction passes; triton: layer 1
as "dot", TF32, one program per tile; pallas: layer 1 as "dot". All configurations of a
size, and `optax.adam` on the same tree (the issue's <= 3x target), are timed in
alternation (one call of each per round: `timing.interleaved_median_and_iqr`), compile and
warm-up excluded, so their ratios hold on a noisy machine; "% floor" is against the copy and
matmul ceilings of the same run (`step.ceilings`, `step.floor_seconds`), so one sweep
gives every configuration's standing against the issue's <= 3x Adam and >= 60% targets.
`--json` keeps the rows with each configuration's options (`{}` for "default", null for
Adam), which `pick_default.py` reads to name the configuration that should become the
default. No state is donated, so the kernels write fresh outputs (`in_place=False`).
`profiling/triton_resources.py` and `profiling/pallas_resources.py` give each kernel's
registers and instruction mix without a GPU; this gives the times.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from step import (  # benchmarks/step.py (run as scripts)
    ADAM_BYTES,
    ADAM_FLOP,
    LOPT_BYTES,
    adam_step,
    ceilings,
    floor_seconds,
    lopt_flop,
    model_shapes,
    random_tree,
)
from sweep_options import update_options  # benchmarks/sweep_options.py
from timing import interleaved_median_and_iqr  # benchmarks/timing.py

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.pallas.blocks import LAYER1_FORMS, MLP_PRECISIONS, TILE_ORDERS


def _update_fn(backend):
    if backend == "triton":
        from lopt_fast.kernels import triton_update

        return triton_update
    from lopt_fast.pallas import pallas_update

    return pallas_update


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", choices=("triton", "pallas"), default="triton")
    ap.add_argument("--sizes", nargs="*", type=float, default=[1e7, 1e8])
    ap.add_argument("--tiles", nargs="*", default=["1x128", "1x256", "1x512"])
    ap.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    ap.add_argument("--layer1", nargs="*", choices=LAYER1_FORMS, default=None,
                    help="first layer as a dot of the per-element features, or of all 28 "
                         "(lopt_fast/kernels/adafac_triton.py); default: the backend's "
                         "default")
    ap.add_argument("--precision", nargs="*", choices=MLP_PRECISIONS, default=["tf32"],
                    help="the dots' operands (mlp_precision)")
    ap.add_argument("--stages", nargs="*", type=int, default=[2],
                    help="num_stages of the persistent kernel's tile loop (the other kernels "
                         "have no loop)")
    ap.add_argument("--early-weights", nargs="*", choices=("off", "on"), default=["off"],
                    help="pallas only: the apply kernels read the MLP's biases and output "
                         "layer before any math (pallas_update's `early_weights`)")
    ap.add_argument("--tile-order", nargs="*", choices=TILE_ORDERS, default=["rows"],
                    help="pallas only: across a row block's tiles first, or down a column "
                         "block's (pallas_update's `tile_order`)")
    ap.add_argument("--persistent", nargs="*", choices=("off", "on"), default=["off"],
                    help="triton only: the apply pass as a persistent kernel (triton_update's "
                         "`persistent`)")
    ap.add_argument("--reduction-tiles", nargs="*", default=["library"],
                    help="the reduction passes' tile under an explicit apply tile: 'library' "
                         "(the library's, `reduction_block_sizes`, as the default config's), "
                         "'same' (the apply tile: every pass's) or RxC")
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the rows and ceilings here")
    args = ap.parse_args(argv)

    lopt = AdafacMLPLOpt(hidden_size=args.hidden_size)
    theta = lopt.init(jax.random.key(0))
    update = _update_fn(args.backend)
    triton = args.backend == "triton"
    if triton:
        kernel_forms = [{"layer1": l1, "mlp_precision": prec, "persistent": pers == "on"}
                        for l1 in args.layer1 or ["dot"] for prec in args.precision
                        for pers in args.persistent]
    else:
        kernel_forms = [{"layer1": l1, "mlp_precision": prec, "early_weights": early == "on",
                         "tile_order": order}
                        for l1 in args.layer1 or ["dot"] for prec in args.precision
                        for early in args.early_weights for order in args.tile_order]
    configs = {"default": {}}  # name: its options as the JSON records them (`update_options`)
    for tile in args.tiles:
        for warps in args.warps:
            for form in kernel_forms:
                # Only the persistent kernel has a loop for num_stages to pipeline.
                for stages in args.stages if form.get("persistent") else [None]:
                    for reduction in args.reduction_tiles:
                        parts = [f"{tile} w{warps}", form["layer1"], form.get("mlp_precision"),
                                 "early" if form.get("early_weights") else "",
                                 "columns" if form.get("tile_order") == "columns" else "",
                                 f"persistent s{stages}" if stages else "",
                                 "" if reduction == "library" else f"reduction {reduction}"]
                        name = " ".join(part for part in parts if part)
                        spec = {"tile": tile, "warps": warps, **form, "reduction": reduction}
                        if stages:
                            spec["stages"] = stages
                        configs[name] = spec

    ceil = ceilings(jax.default_backend() == "cpu", args.repeats)
    print(f"{args.backend} on {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"H={args.hidden_size}; ceilings: copy {ceil['copy_GBps']:.1f} GB/s, matmul "
          f"{ceil['matmul_GFLOPs']:.1f} GFLOP/s")
    print("| params | tile | ms | iqr ms | % floor | x default | x adam |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for n in args.sizes:
        shapes = model_shapes(int(n))  # the same square matrix plus bias as step.py
        nparams = sum(int(np.prod(s)) for s in shapes.values())
        params = random_tree(shapes, jax.random.key(1))
        grad = random_tree(shapes, jax.random.key(2))
        state = lopt.opt_fn(theta, backend="reference").init(params, num_steps=1000)
        adam_fn, adam_carry, adam_rest = adam_step(shapes, None)
        calls = {"optax.adam": (adam_fn, (*adam_carry, *adam_rest))}
        matrix = max(shapes.values(), key=len)
        for name, spec in configs.items():
            options = update_options(spec, matrix)
            # Not donated, as Adam is not: fresh outputs, so XLA copies nothing first.
            fn = jax.jit(lambda s, g, options=options: update(lopt, theta, s, g, in_place=False,
                                                              **options))
            calls[name] = (fn, (state, grad))
        times = interleaved_median_and_iqr(calls, args.repeats)
        base, adam = times["default"][0], times["optax.adam"][0]
        for name, (t, iqr) in sorted(times.items(), key=lambda kv: kv[1][0]):
            floor = (floor_seconds(nparams, ADAM_BYTES, ADAM_FLOP, ceil) if name == "optax.adam"
                     else floor_seconds(nparams, LOPT_BYTES, lopt_flop(args.hidden_size), ceil))
            rows.append({"params": nparams, "config": name, "ms": t * 1e3, "iqr_ms": iqr * 1e3,
                         "pct_of_floor": 100 * floor / t, "x_default": t / base,
                         "x_adam": t / adam,
                         "options": configs.get(name)})
            print(f"| {nparams:,} | {name} | {t * 1e3:.3f} | {iqr * 1e3:.3f} | "
                  f"{100 * floor / t:.1f} | {t / base:.2f} | {t / adam:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "device": str(jax.devices()[0].device_kind),
                       "jax": jax.__version__, "hidden_size": args.hidden_size,
                       "ceilings": ceil, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
