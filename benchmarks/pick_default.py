"""Which swept configuration should become the default: the rule of docs/KERNELS.md, applied
to `tile_sweep.py --json` files.

    python benchmarks/pick_default.py out/sweep_pallas.json out/sweep_order.json

A configuration qualifies when, at every size its sweep timed, it beat that run's "default"
by more than the two rows' interquartile ranges together (default ms - its ms > default
iqr + its iqr), and its dot operands are precise enough for the default (`--precisions`:
TF32's tolerance row; bf16 stays opt-in). Each file's "default" and Adam were timed in
alternation with its configurations, so only ratios within a file are compared: the
qualifying configurations are ranked by the geometric mean over sizes of their time over
that run's default ("x default"), and the first is the backend's pick. A pick combines nothing:
options that won in different sweeps (say a tile order and a layer-1 form) were never
timed together. Whether its kernel tests passed on the same GPU is for the tests' log.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def qualifying(sweep: dict, precisions: tuple[str, ...]) -> list[dict]:
    """The configurations of one sweep that beat its default at every size (see the
    module docstring), best first: [{config, options, x_default (geometric mean),
    x_adam (at the largest size), pct_of_floor (at the largest size)}]."""
    by_size = defaultdict(dict)
    for row in sweep["rows"]:
        by_size[row["params"]][row["config"]] = row
    names = set.intersection(*(set(rows) for rows in by_size.values())) if by_size else set()
    largest = by_size[max(by_size)] if by_size else {}
    picks = []
    for name in sorted(names - {"default", "optax.adam"}):
        options = largest[name]["options"]
        if options["mlp_precision"] not in precisions:
            continue
        rows = [(rows[name], rows["default"]) for rows in by_size.values()]
        if all(base["ms"] - row["ms"] > base["iqr_ms"] + row["iqr_ms"] for row, base in rows):
            picks.append({"config": name, "options": options,
                          "x_default": math.exp(sum(math.log(row["ms"] / base["ms"])
                                                    for row, base in rows) / len(rows)),
                          "x_adam": largest[name]["x_adam"],
                          "pct_of_floor": largest[name]["pct_of_floor"]})
    return sorted(picks, key=lambda p: p["x_default"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="tile_sweep.py --json files")
    ap.add_argument("--precisions", nargs="*", default=["tf32", "tf32_fp16"],
                    help="mlp_precision values a default may take")
    ap.add_argument("--json", default=None, help="also write the pick (or null) here")
    args = ap.parse_args(argv)

    everyone = defaultdict(list)  # backend: its sweeps' qualifying configurations
    for path in args.sweeps:
        with open(path) as f:
            sweep = json.load(f)
        if any("options" not in row for row in sweep["rows"]):
            raise SystemExit(f"{path}: rows without options (a tile_sweep.py before session "
                             "25 wrote it): it cannot say which precision a row ran at")
        picks = qualifying(sweep, tuple(args.precisions))
        print(f"{path} ({sweep['backend']} on {sweep['device']}): "
              f"{len(picks) or 'no'} configuration(s) beat the default at every size")
        for p in picks:
            print(f"  {p['config']}: x default {p['x_default']:.3f}, at the largest size "
                  f"x adam {p['x_adam']:.2f}, {p['pct_of_floor']:.1f}% of the floor")
        everyone[sweep["backend"]] += [{**p, "sweep": path} for p in picks]
    chosen = {}  # backend: its pick, or None
    for backend, picks in everyone.items():
        pick = chosen[backend] = min(picks, key=lambda p: p["x_default"], default=None)
        if pick is None:
            print(f"pick for {backend}: none, its defaults stay")
        else:
            options = ", ".join(f"{k}={v!r}" for k, v in pick["options"].items())
            print(f"pick for {backend}: {pick['config']} ({pick['sweep']}): {options}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(chosen, f, indent=1)


if __name__ == "__main__":
    main()
