"""Registers, spills and instruction mix of the Pallas kernels compiled for sm_90, no GPU needed.

    python profiling/pallas_resources.py                          # a 4096 x 4096 matrix + bias
    python profiling/pallas_resources.py --layer1 dot dot_all --shape 1024 1000 --warps 4 8

Lowers one `pallas_update` step for CUDA (`lowering_platforms=("cuda",)`, no GPU or CUDA
plugin needed; an H100 as the abstract target, `lopt_fast.pallas.gpu_target`), keeps the
Triton module that Pallas' Triton lowering emits for each `pallas_call`, and compiles it
with the installed triton's `triton.compile` for sm_90 with the launch's num_warps /
num_stages: the step XLA would take on a GPU. Then the same report as
`triton_resources.py` (ptxas' registers and spills, the SASS instruction mix). On CPU this
is also the only check that the Pallas kernels compile to machine code, not just lower
(`tests/test_pallas_step.py` runs it).

Needs triton; reads Pallas' Triton modules through a private JAX function
(`jax._src.pallas.triton.pallas_call_registration.lowering.lower_jaxpr_to_triton_module`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import IRSource, make_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_resources import resources, warps_per_sm  # noqa: E402

from lopt_fast.learned import AdafacMLPLOpt  # noqa: E402
from lopt_fast.pallas import BlockSizes, abstract_gpu, block_sizes, pallas_update  # noqa: E402
from lopt_fast.pallas.blocks import (  # noqa: E402
    LAYER1_FORMS,
    MLP_PRECISIONS,
    reduction_block_sizes,
)


def _lowering_module():
    """The module of Pallas' Triton lowering whose `lower_jaxpr_to_triton_module` builds
    each kernel's Triton module, or None if this JAX has no such private function."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError:
        return None
    lowering = getattr(registration, "lowering", None)
    return lowering if hasattr(lowering, "lower_jaxpr_to_triton_module") else None


def unavailable_reason() -> str | None:
    """Why this tool cannot read Pallas' Triton modules here, or None if it can."""
    if _lowering_module() is None:
        return (f"jax {jax.__version__} has no jax._src.pallas.triton.pallas_call_registration"
                ".lowering.lower_jaxpr_to_triton_module (Pallas' Triton lowering moved or is gone)")
    return None


@contextlib.contextmanager
def _triton_modules():
    """Collects (name, Triton IR text) of every pallas_call lowered for a GPU inside."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    lowering = _lowering_module()
    lower = lowering.lower_jaxpr_to_triton_module
    modules = []

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        op = result.module.operation
        modules.append((op.attributes["sym_name"].value, op.get_asm()))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = lower


def step_modules(shapes: dict, hidden: int = 32, layer1: str = "dot",
                 blocks: BlockSizes | None = None, mlp_precision: str = "tf32",
                 early_weights: bool = False, dtype=jnp.float32) -> list[tuple[str, str]]:
    """(pallas_call name, Triton IR) of each launch of one step on params `shapes` of
    `dtype` (traced from their shapes: nothing of their size is allocated)."""
    lopt = AdafacMLPLOpt(hidden_size=hidden)
    theta = lopt.init(jax.random.key(0))
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
    state = jax.eval_shape(
        lambda p: lopt.opt_fn(theta, backend="reference").init(p, num_steps=50), params)
    step = jax.jit(lambda t, s, g: pallas_update(lopt, t, s, g, interpret=False, layer1=layer1,
                                                 blocks=blocks, mlp_precision=mlp_precision,
                                                 early_weights=early_weights))
    with _triton_modules() as modules, abstract_gpu():
        step.trace(theta, state, params).lower(lowering_platforms=("cuda",))
    return modules


def compile_module(ir_text: str, num_warps: int = 4, num_stages: int = 2):
    """A Pallas Triton module compiled for sm_90 as XLA compiles it.

    `triton.compile` of an IR file skips the passes of its first stage (make_ttir:
    canonicalisation, Triton's combine patterns such as dot(a, b, 0) + c -> dot(a, b, c),
    CSE), which XLA's Triton pipeline runs on a Pallas module before the rest
    (xla/backends/gpu/codegen/triton/compilation_pipeline_cuda.cc): so they run here
    first, and the result is compiled from TTIR on."""
    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    backend = make_backend(target)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        context = ir.context()
        module = IRSource(path, context, backend).module
        module.context = context  # as triton.compile's IRSource.make_ir sets it
        backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
        with open(path, "w") as f:
            f.write(str(module))
        return triton.compile(path, target=target, options=options)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=[4096, 4096],
                    help="the matrix (a bias of its last size comes with it)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layer1", nargs="*", choices=LAYER1_FORMS,
                    default=list(LAYER1_FORMS))
    ap.add_argument("--warps", nargs="*", type=int, default=[4])
    ap.add_argument("--tile", default=None,
                    help="RxC: the factored tensors' tile in every pass (default: the "
                         "library's apply and reduction tiles)")
    ap.add_argument("--precision", choices=MLP_PRECISIONS, default="tf32",
                    help="the dots' operands (mlp_precision)")
    ap.add_argument("--early-weights", action="store_true",
                    help="the apply kernels read the MLP's biases with its dots' weights")
    args = ap.parse_args(argv)

    shapes = {"w": tuple(args.shape), "b": (args.shape[1],)}
    tile, reduction = block_sizes(*args.shape, args.hidden), reduction_block_sizes(*args.shape)
    if args.tile:
        tile = reduction = BlockSizes.parse(args.tile)
    print(f"sm_90, triton {triton.__version__}, jax {jax.__version__}, H={args.hidden}, "
          f"{args.precision} dots{', early weights' if args.early_weights else ''}, "
          f"params {shapes}; apply tile {tile.rows}x{tile.cols}, reduction tile "
          f"{reduction.rows}x{reduction.cols} ({'--tile' if args.tile else 'the library'}'s "
          f"choice at 4 warps; other warps or --tile set the apply tile for all three "
          f"passes)")
    print(f"{'kernel':24s} {'layer 1':7s} {'warps':>5s} {'regs':>5s} {'spill st/ld B':>14s} "
          f"{'warps/SM':>8s} {'SASS':>5s} {'FFMA':>6s} {'HGMMA':>5s} {'MUFU':>5s} {'LDG':>4s} "
          f"{'STG':>4s} {'RT':>3s}")
    for layer1 in args.layer1:
        for warps in args.warps:
            blocks = (None if warps == 4 and not args.tile
                      else BlockSizes(tile.rows, tile.cols, num_warps=warps))
            for name, ir_text in step_modules(shapes, args.hidden, layer1, blocks,
                                              args.precision, args.early_weights):
                # packed kernels launch with their own blocks' warps (the default, 4)
                w = warps if "packed" not in name else 4
                regs, st, ld, ops, trips = resources(compile_module(ir_text, w))
                per_sm = warps_per_sm(regs, w)
                print(f"{name:24s} {layer1:7s} {w:5d} {regs:5d} {f'{st}/{ld}':>14s} "
                      f"{per_sm:8d} {sum(ops.values()):5d} {ops['FFMA']:6d} {ops['HGMMA']:5d} "
                      f"{ops['MUFU']:5d} {ops['LDG']:4d} {ops['STG']:4d} {trips:3d}")


if __name__ == "__main__":
    main()
