"""Registers, spills and shared memory of the Triton kernels compiled for sm_90, no GPU needed.

    python profiling/triton_resources.py                       # default tile of a large matrix
    python profiling/triton_resources.py --tiles 8x32 16x32 --warps 4 8 --hidden 32

Compiles each kernel with `triton.compile` for an sm_90 target (as `tests/test_triton_step.py`
does) and reads ptxas' resource report (`ptxas -v`, the ptxas that ships with triton) and
the SASS instruction mix (`nvdisasm` of the cubin): how many registers a thread uses, how
many bytes spill to local memory, how many instructions a thread runs in all (the kernels
have no loops, so this is what each thread issues per tile: with 4 schedulers per SM it
bounds an issue-limited kernel's time) and how many of them are FFMA / HGMMA (wgmma), and
RT, the global-load round trips a thread waits for one after another (`load_round_trips`).
A kernel that spills, uses so many registers that few warps fit on an SM, or waits on
many round trips in sequence is latency bound: the first things to read before timing a
tile or warp change on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

import jax.numpy as jnp
import triton
from triton.backends.compiler import GPUTarget

from lopt_fast.kernels import adafac_triton as at
from lopt_fast.pallas import plan
from lopt_fast.pallas.blocks import (
    LAYER1_FORMS,
    MLP_PRECISIONS,
    BlockSizes,
    block_sizes,
    packed_block_sizes,
    padded_hidden,
    reduction_block_sizes,
)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
REGS_PER_SM = 65536
REG_ALLOCATION_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64


def compile_kernel(kernel, constexprs, dtypes, num_warps, num_stages=2):
    """`kernel` compiled for sm_90: constexprs by name, pointer dtypes by name ("*fp32"
    otherwise, but the H x H and output layers' weights in their dots' operand type under
    a 16-bit PREC, as `plan.mlp_weights` hands them), every other parameter an i32 size.
    Pointers are 16-byte aligned, as jax-triton declares every array argument
    (`tt.divisibility = 16`); sizes carry no divisibility, as jax-triton passes them."""
    sig, attrs = {}, {}
    weights = plan.later_weights_dtype(constexprs.get("PREC", "tf32"))
    weights = {None: "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[
        weights and jnp.dtype(weights).name]
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = dtypes.get(name, weights if name in ("wh_ptr", "wo_ptr") else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def apply_constexprs(layer1: str, hp: int, precision: str) -> dict:
    """The apply kernel's layer-1 constexprs (under `precision`) as
    `TritonKernels.factored_apply` passes them."""
    if layer1 == "dot_all":  # plan._row_col_features' shapes
        tw, w_rows = plan.ROW_COL_TABLE_WIDTH, plan.NUM_EW_FACTORED + 2 * plan.ROW_COL_TABLE_WIDTH
    else:
        tw, w_rows = hp, plan.NUM_EW_FACTORED
    return dict(L1=layer1, PLANES=at.row_col_as_planes(layer1, precision), TW=tw,
                WR=w_rows, VA=16)  # rows of a multiple of 16 elements


def warps_per_sm(regs: int, num_warps: int) -> int:
    """Register-limited warps per SM of a kernel of `num_warps` warps: registers are
    allocated per warp in units of 256 (8 per thread: 170 registers take 176, so 2
    programs of 4 warps fit, not 3), and occupancy caps at 64 warps per SM."""
    per_warp = -(-regs * 32 // REG_ALLOCATION_UNIT) * REG_ALLOCATION_UNIT
    return min(MAX_WARPS_PER_SM, REGS_PER_SM // per_warp // num_warps * num_warps)


class Resources(NamedTuple):
    regs: int
    spill_stores: int  # bytes
    spill_loads: int
    ops: collections.Counter  # SASS opcode -> instructions per thread
    load_round_trips: int  # `load_round_trips`


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9.]+)\s*([^;]*);", re.M)


def load_round_trips(sass: str) -> int:
    """Global-load round trips a thread waits for one after another before its first
    branch, read off the SASS order: a run of loads (LDG) ends at the first instruction
    that reads a register one of them writes (the thread waits there for the run's data),
    and the next load starts another run. An estimate: it does not tell an L1 / L2 hit from
    DRAM (the apply kernels read p again, from the cache, for the update: one run), nor
    count the loads of the branches (the factored apply kernels' side copies, in their
    first row / column blocks only; a multi-member launch's members)."""
    pending, runs, in_run = set(), 0, False
    for m in _SASS_LINE.finditer(sass):
        op, operands = m.group(1), m.group(2).split(",")
        if op.startswith("BRA"):
            break
        sources = operands if op.startswith(("ST", "RED", "ATOM")) else operands[1:]
        if pending & {int(r) for x in sources for r in re.findall(r"\bR(\d+)\b", x)}:
            pending, in_run = set(), False
        if op.startswith("LDG"):
            runs += not in_run
            in_run = True
            dest = re.match(r"\s*R(\d+)", operands[0])
            if dest:
                width = {"64": 2, "128": 4}.get(op.rsplit(".", 1)[-1], 1)
                pending |= set(range(int(dest.group(1)), int(dest.group(1)) + width))
    return runs


def resources(compiled) -> Resources:
    """ptxas' registers / spill bytes, the SASS opcode counts and load round trips of a
    compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        rep = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
        cubin = os.path.join(d, "c.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), cubin], capture_output=True,
                              text=True).stdout
    text = rep.stderr + rep.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    ops = collections.Counter(m.group(1).split(".")[0] for m in _SASS_LINE.finditer(sass))
    return Resources(regs, spill_st, spill_ld, ops, load_round_trips(sass))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tiles", nargs="*", default=None,
                    help="RxC tiles of the factored kernels (default: the chosen one)")
    ap.add_argument("--warps", nargs="*", type=int, default=[4])
    ap.add_argument("--layer1", nargs="*", choices=LAYER1_FORMS, default=list(LAYER1_FORMS))
    ap.add_argument("--precision", nargs="*", choices=MLP_PRECISIONS, default=["tf32"],
                    help="the dots' operands (mlp_precision)")
    ap.add_argument("--persistent", nargs="*", type=int, default=[],
                    help="also the persistent apply kernel with these num_stages (its tile "
                         "loop's depth; 1 = not pipelined)")
    args = ap.parse_args(argv)

    hp = padded_hidden(args.hidden)
    default = block_sizes(4096, 4096, args.hidden)
    packed = packed_block_sizes(args.hidden)
    reduction = reduction_block_sizes(4096, 4096)
    tiles = args.tiles or [f"{default.rows}x{default.cols}"]
    mlp = dict(HP=hp, NHID=args.layers - 1, EXP_MULT=0.001, STEP_MULT=0.001)
    print(f"sm_90, triton {triton.__version__}, H={args.hidden} (padded {hp}), "
          f"{args.layers} layers; default tile for a large matrix {default.rows}x{default.cols}")
    print(f"{'kernel':30s} {'tile':7s} {'warps':>5s} {'regs':>5s} {'spill st/ld B':>14s} "
          f"{'warps/SM':>8s} {'smem KB':>7s} {'SASS':>5s} {'FFMA':>6s} {'HGMMA':>5s} "
          f"{'MUFU':>5s} {'LDG':>4s} {'LDGSTS':>6s} {'STG':>4s} {'RT':>3s}")
    # One 4096 x 4096 matrix (rows a multiple of 16 elements), alone in its launches.
    matrix = (("B", (1,)), ("U", (4096,)), ("VQ", (4096 // 16,)), ("OU", (0,)), ("OV", (0,)))
    sides = dict(TU=4096, TV=4096)
    for warps in args.warps:
        cases = []
        for tile in tiles:
            block = BlockSizes.parse(tile)
            r, c = block.rows, block.cols
            n = (4096 // r) * (4096 // c)
            for l1 in args.layer1:
                for prec in args.precision:
                    apply = dict(sides, SEGS=1, R=r, C=c, **apply_constexprs(l1, hp, prec), PREC=prec,
                                 **mlp)
                    values = matrix + (("SEG", (0,)),)
                    cases.append((f"apply, {l1}, {prec}", tile,
                                  at.factored_apply_kernel((n,), values), apply, 2))
                    cases += [(f"persistent s{st}, {l1}, {prec}", tile,
                               at.factored_apply_kernel((n,), values, persistent=True),
                               dict(apply, TASKS=1, STAGES=st), st)
                              for st in args.persistent]
        # Kernels with tiles of their own, whatever --tiles says: the reduction passes
        # (`reduction_block_sizes`) and the small tensors'.
        mr, mc = reduction.rows, reduction.cols
        cases.append(("moments", f"{mr}x{mc}",
                      at.factored_moments_kernel(((4096 // mr) * (4096 // mc),), matrix),
                      dict(sides, R=mr, C=mc, VA=16), 2))
        pr, pc = packed.rows, packed.cols
        one_member = at.packed_apply_kernel((pr * pc,), (1,), (0,))  # one tile of one tensor
        cases += [(f"packed apply, {prec}", f"{pr}x{pc}", one_member,
                   dict(R=pr, C=pc, PREC=prec, SEGS=1, **mlp), 2)
                  for prec in args.precision]
        for label, shown_tile, kernel, constexprs, stages in cases:
            compiled = compile_kernel(kernel, constexprs, {}, warps, stages)
            regs, st, ld, ops, trips = resources(compiled)
            per_sm = warps_per_sm(regs, warps)
            print(f"{label:30s} {shown_tile:7s} {warps:5d} {regs:5d} "
                  f"{f'{st}/{ld}':>14s} {per_sm:8d} {compiled.metadata.shared / 1024:7.1f} "
                  f"{sum(ops.values()):5d} {ops['FFMA']:6d} {ops['HGMMA']:5d} "
                  f"{ops['MUFU']:5d} {ops['LDG']:4d} {ops['LDGSTS']:6d} {ops['STG']:4d} "
                  f"{trips:3d}")


if __name__ == "__main__":
    main()
