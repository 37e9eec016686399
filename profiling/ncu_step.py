"""Hardware counters of the fused step's moments and apply kernels (Nsight Compute, GPU).

    python profiling/ncu_step.py                                   # pallas, its defaults, 1e7
    python profiling/ncu_step.py --backend pallas --layer1 dot_all --precision bf16 --early-weights
    python profiling/ncu_step.py --backend triton --params 1e8 --out /tmp/ncu

The apply kernel moves 44 B / param at a fifth of the copy rate and issues its
instructions at about a third of the rate an SM can (docs/KERNELS.md): timings alone
cannot say what it waits on. This runs the step under `ncu --set full` (`--clock-control
none`: the card's clocks as found), profiles the moments and apply kernels of the step
after `--warmup` ones, and prints for each: duration, DRAM and SM throughput, achieved
against theoretical occupancy, registers, issue-slot use, and the warp stall reasons in
cycles per issued instruction, largest first (`long_scoreboard`: waiting on global
memory; `barrier`: on the other warps at a `bar.sync`; `wait`: fixed-latency
dependencies; `math_pipe_throttle`; `mio_throttle` / `short_scoreboard`: shared memory;
...), then the SASS instructions where its warps' stall samples land, and those samples
by opcode. `--out` gets the report (`step.ncu-rep`, for the Nsight Compute UI), ncu's
details page as text (its tables and advice), the raw metrics and the SASS source page
with its per-instruction counters as CSV.

The state is not advanced (every step updates the same inputs) and not donated
(`in_place=False`: fresh outputs, no XLA copies), and JAX allocates each buffer on its
own (`XLA_PYTHON_CLIENT_ALLOCATOR=platform`) so that ncu's kernel replay saves and
restores those buffers rather than a preallocated pool.
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import os
import shutil
import subprocess
import sys

# Kernels by backend: Pallas launches carry their pallas_call names; jax-triton's their
# Triton functions' (profiling/trace_step.py). A regex for ncu's --kernel-name.
KERNELS = {
    "pallas": "regex:adafac_(moments|apply)",  # not adafac_packed_*
    "triton": "regex:_factored_(moments|apply)",
}
# Printed first for each kernel, where the report has them (ncu metric names).
HEADLINE = (
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_bytes.sum",
    # L2 -> SM traffic: the "dot" form's per-column table is 128 B per element at 1x256,
    # three times the tile's own 44 B of DRAM traffic (docs/KERNEL-SESSIONS.md, "Session 22")
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sector_hit_rate.pct",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "l1tex__t_sector_hit_rate.pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
    "launch__occupancy_limit_shared_mem",
    "launch__block_size",
    "launch__grid_size",
)
STALL = "issue_stalled"  # smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio


def _target(args):
    """The profiled process: `--warmup` + `--steps` steps of the fused update."""
    import jax

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "benchmarks"))
    from step import model_shapes, random_tree  # benchmarks/step.py: the tree it times

    from lopt_fast.learned import AdafacMLPLOpt

    if args.backend == "triton":
        from lopt_fast.kernels import triton_update as update
    else:
        from lopt_fast.pallas import pallas_update as update
    lopt = AdafacMLPLOpt(hidden_size=args.hidden_size)
    theta = lopt.init(jax.random.key(0))
    shapes = model_shapes(int(args.params))
    params, grad = random_tree(shapes, jax.random.key(1)), random_tree(shapes, jax.random.key(2))
    state = lopt.opt_fn(theta, backend="reference").init(params, num_steps=1000)
    options = {k: v for k, v in (("layer1", args.layer1), ("mlp_precision", args.precision),
                                 ("early_weights", args.early_weights or None),
                                 ("tile_order", args.tile_order)) if v is not None}
    step = jax.jit(lambda s, g: update(lopt, theta, s, g, in_place=False, **options))
    for _ in range(args.warmup + args.steps):
        out = jax.block_until_ready(step(state, grad))
    print(f"ran {args.warmup + args.steps} steps of {args.backend} {options} on "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} params, "
          f"{jax.devices()[0].device_kind}; finite: "
          f"{all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(out))}")


def find_ncu() -> str | None:
    """ncu on PATH, or in a CUDA / Nsight Compute install."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/ncu")
                        + glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return candidates[-1] if candidates else None


def parse_raw_csv(text: str) -> list[dict[str, tuple[str, str]]]:
    """ncu's `--page raw --csv`: a header of metric names, a row of units, one row per
    kernel -> per kernel {metric: (value, unit)}."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return []
    header, rest = rows[0], rows[1:]
    units = [""] * len(header)
    if rest and not rest[0][0].strip().isdigit():  # the units row has no kernel ID
        units, rest = rest[0], rest[1:]
    return [{name: (value, unit) for name, value, unit in zip(header, row, units, strict=False)}
            for row in rest]


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return None


def summarize(kernels: list[dict[str, tuple[str, str]]], top: int = 12) -> str:
    """Each kernel's headline metrics and its largest warp stall reasons."""
    lines = []
    for k in kernels:
        name = k.get("Kernel Name", ("?", ""))[0]
        lines.append(f"== {name}  (block {k.get('Block Size', ('?',))[0]}, "
                     f"grid {k.get('Grid Size', ('?',))[0]})")
        for metric in HEADLINE:
            if metric in k:
                value, unit = k[metric]
                lines.append(f"  {metric:58s} {value:>16s} {unit}")
        stalls = [(m.split(STALL + "_")[-1].split("_per_issue")[0], _number(v))
                  for m, (v, _) in k.items()
                  if STALL in m and m.endswith("per_issue_active.ratio")]
        stalls = sorted(((r, v) for r, v in stalls if v is not None), key=lambda rv: -rv[1])
        if stalls:
            lines.append(f"  warp stalls, cycles per issued instruction (sum "
                         f"{sum(v for _, v in stalls):.2f}):")
            lines += [f"    {reason:30s} {value:8.3f}" for reason, value in stalls[:top]]
    return "\n".join(lines)


def parse_source_csv(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """ncu's `--page source --csv --print-source sass`: per profiled kernel a table whose
    header names the columns (the SASS text under "Source", per-instruction metrics such
    as the warp stall samples) and a row per instruction -> [(header, rows)] in order.
    Lines that are not part of such a table (a kernel's title) end the one before."""
    tables, header, rows = [], None, []
    for row in csv.reader(io.StringIO(text)):
        if "Source" in row and any("Sampling" in cell for cell in row):
            if header:
                tables.append((header, rows))
            header, rows = row, []
        elif header and len(row) == len(header):
            rows.append(row)
        elif header:
            tables.append((header, rows))
            header, rows = None, []
    if header:
        tables.append((header, rows))
    return tables


def _opcode(sass: str) -> str:
    """'@!P0 HGMMA.64x32x8.F32.TF32 R56, ...' -> 'HGMMA'."""
    words = [w for w in sass.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def source_hotspots(header: list[str], rows: list[list[str]], top: int = 20) -> str:
    """One kernel's SASS instructions with the most warp stall samples (where its warps
    wait, and on what: the instruction after a wait is where the sample lands), and the
    samples summed by opcode."""
    samples = next((i for i, h in enumerate(header) if "Warp Stall Sampling (All" in h),
                   next((i for i, h in enumerate(header) if "Sampling" in h), None))
    source = header.index("Source")
    address = header.index("Address") if "Address" in header else None
    counted = [(_number(r[samples]) or 0.0, r) for r in rows]
    total = sum(n for n, _ in counted)
    if not total:
        return f"  no stall samples in '{header[samples]}'"
    lines = [f"  {header[samples]}: {total:,.0f}; the top {top} instructions:"]
    for n, r in sorted(counted, key=lambda nr: -nr[0])[:top]:
        where = f"{r[address]:>8s} " if address is not None else ""
        lines.append(f"    {100 * n / total:5.1f}%  {where}{r[source].strip()}")
    by_op = collections.Counter()
    for n, r in counted:
        by_op[_opcode(r[source])] += n
    lines.append("  by opcode: " + ", ".join(f"{op} {100 * n / total:.1f}%"
                                             for op, n in by_op.most_common(12)))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", choices=tuple(KERNELS), default="pallas")
    ap.add_argument("--params", type=float, default=1e7)
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--layer1", default=None, help="the backend's default unless given")
    ap.add_argument("--precision", default=None, help="mlp_precision; the default unless given")
    ap.add_argument("--early-weights", action="store_true",
                    help="pallas: read the MLP's biases and output layer before the math")
    ap.add_argument("--tile-order", default=None,
                    help="pallas: the order of a tensor's tiles (blocks.TILE_ORDERS); the "
                         "default unless given")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    ap.add_argument("--steps", type=int, default=1, help="steps profiled")
    ap.add_argument("--out", default="/tmp/lopt_fast_ncu")
    ap.add_argument("--target", action="store_true", help=argparse.SUPPRESS)  # the profiled run
    args = ap.parse_args(argv)
    if args.target:
        return _target(args)

    ncu = find_ncu()
    if ncu is None:
        print("ncu (Nsight Compute) not found on PATH, in /usr/local/cuda*/bin or "
              "/opt/nvidia/nsight-compute/*", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = os.path.join(args.out, "step")
    forwarded = list(argv if argv is not None else sys.argv[1:])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_ALLOCATOR="platform")
    kernels_per_step = 2  # moments and apply: one launch each for a matrix + bias
    cmd = [ncu, "--clock-control", "none", "--set", "full", "--kernel-name",
           KERNELS[args.backend], "--launch-skip", str(kernels_per_step * args.warmup),
           "--launch-count", str(kernels_per_step * args.steps), "--export", report,
           "--force-overwrite", sys.executable, os.path.abspath(__file__), "--target",
           *forwarded]
    version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout
    print(version.strip().splitlines()[-1:], " ".join(cmd), sep="\n", flush=True)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", flush=True)
    if not os.path.exists(report + ".ncu-rep"):
        print(f"no report (ncu exit {run.returncode}); the kernels this step launched:",
              flush=True)
        names = subprocess.run([ncu, "--clock-control", "none", "--section", "LaunchStats",
                                "--launch-count", "60", "--csv", "--page", "raw",
                                sys.executable, os.path.abspath(__file__), "--target",
                                *forwarded],
                               env=env, capture_output=True, text=True)
        print(sorted({k.get("Kernel Name", ("?",))[0]
                      for k in parse_raw_csv(names.stdout[names.stdout.find('"ID"'):])}))
        return 1
    for page, suffix in (("details", ".txt"), ("raw", ".csv")):
        text = subprocess.run([ncu, "--import", report + ".ncu-rep", "--page", page]
                              + (["--csv"] if page == "raw" else []),
                              capture_output=True, text=True).stdout
        with open(os.path.join(args.out, f"{page}{suffix}"), "w") as f:
            f.write(text)
    with open(os.path.join(args.out, "raw.csv")) as f:
        kernels = parse_raw_csv(f.read())
    print(summarize(kernels))
    # Per SASS instruction, where the warps stalled (the report's source counters; an
    # older ncu without `--print-source` says so here and the rest stands).
    page = subprocess.run([ncu, "--import", report + ".ncu-rep", "--page", "source", "--csv",
                           "--print-source", "sass"], capture_output=True, text=True)
    with open(os.path.join(args.out, "source.csv"), "w") as f:
        f.write(page.stdout)
    tables = parse_source_csv(page.stdout)
    if not tables:
        print(f"no SASS source page (ncu exit {page.returncode}): {page.stderr[-600:]}")
    names = [k.get("Kernel Name", ("?",))[0] for k in kernels]
    for i, (header, rows) in enumerate(tables):
        name = names[i] if len(names) == len(tables) else f"kernel {i}"
        print(f"== {name}: stall samples by SASS instruction\n{source_hotspots(header, rows)}")
    print(f"report, details.txt, raw.csv and source.csv in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
