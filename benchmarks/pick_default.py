"""Which swept configuration should become the default: the rule of docs/KERNELS.md, applied
to `tile_sweep.py --json` files.

    python benchmarks/pick_default.py out/sweep_pallas.json out/sweep_order.json
    python benchmarks/pick_default.py call1/sweep_*.json --step call2/step.json call2/step_donated.json

A configuration qualifies when, at every size its sweep timed, it beat that run's "default"
by more than the two rows' interquartile ranges together (default ms - its ms > default
iqr + its iqr), and its dot operands are precise enough for the default (`--precisions`:
TF32's tolerance row; bf16 stays opt-in). Each file's "default" and Adam were timed in
alternation with its configurations, so only ratios within a file are compared: the
qualifying configurations are ranked by the geometric mean over sizes of their time over
that run's default ("x default"), and the first is the backend's pick. A pick combines nothing:
options that won in different sweeps (say a tile order and a layer-1 form) were never
timed together. Whether its kernel tests passed on the same GPU is for the tests' log.

`--step` then checks each pick on step.py's workloads (`step.py --pick` with this script's
JSON: rows "<backend> pick" next to "<backend>" in the same run, with the state kept or
donated, at 1e7 / 1e8 and the meta-training shape): the pick is confirmed unless it is
slower than the backend's default there by more than the two rows' iqrs at some workload.
A sweep win that costs the meta-training step is not a default.
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


def step_check(pick: dict, backend: str, steps: dict[str, dict]) -> dict:
    """`pick` (a backend's, from `qualifying`) on step.py's workloads: {"confirmed": bool
    (None if no file timed it), "x_default": {file: {workload: pick ms / default ms}},
    "slower": the workloads where it lost beyond the iqrs}."""
    ratios, slower, timed = {}, [], False
    for path, step in steps.items():
        if ((step["info"].get("pick") or {}).get(backend) or {}).get("config") != pick["config"]:
            continue  # step.py ran without this pick (or with another)
        rows = defaultdict(dict)
        for row in step["rows"]:
            rows[row["workload"]][row["backend"]] = row
        for workload, by_backend in rows.items():
            base, row = by_backend.get(backend), by_backend.get(f"{backend} pick")
            if base is None or row is None:
                continue
            timed = True
            ratios.setdefault(path, {})[workload] = row["ms"] / base["ms"]
            if row["ms"] - base["ms"] > base["iqr_ms"] + row["iqr_ms"]:
                slower.append(f"{path}: {workload}")
    return {"confirmed": (not slower) if timed else None, "x_default": ratios,
            "slower": slower}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="tile_sweep.py --json files")
    ap.add_argument("--precisions", nargs="*", default=["tf32", "tf32_fp16"],
                    help="mlp_precision values a default may take")
    ap.add_argument("--json", default=None, help="also write the pick (or null) here")
    ap.add_argument("--step", nargs="*", default=[],
                    help="step.py --pick --json files: check each pick on their workloads")
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
    steps = {}
    for path in args.step:
        with open(path) as f:
            steps[path] = json.load(f)
    for backend, pick in chosen.items() if steps else ():
        if pick is None:
            continue
        check = pick["step_check"] = step_check(pick, backend, steps)
        for path, ratios in check["x_default"].items():
            print(f"  {backend} pick in {path}: x default " + ", ".join(
                f"{w} {r:.3f}" for w, r in ratios.items()))
        verdict = {None: "not timed by step.py --pick", True: "confirmed",
                   False: "slower at " + "; ".join(check["slower"])}[check["confirmed"]]
        print(f"step check for {backend}: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(chosen, f, indent=1)


if __name__ == "__main__":
    main()
