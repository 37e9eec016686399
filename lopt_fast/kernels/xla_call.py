"""Triton kernels launched as XLA's own Triton calls (`__gpu$xla.gpu.triton`), without jax-triton.

XLA records only its own kernels and command-buffer-compatible FFI calls into CUDA graphs.
jax-triton 0.3.1's launches are neither (`ffi_call`: compiled for an H100 with jax 0.10.2,
a 64-task convnet step is 40 host launches through jax-triton, 1 graph through Pallas).
Pallas (up to jaxlib 0.10.2) hands XLA its kernels as Triton IR in a `__gpu$xla.gpu.triton`
custom call, which XLA compiles with its own Triton pipeline into ordinary kernels.
`xla_triton_call` does the same for a `@triton.jit` kernel:

1. the `triton` package turns the kernel into Triton IR (TTIR), every parameter that is not
   an array bound as a constexpr (XLA passes a kernel its operands, then its results, all
   as pointers, so sizes become compile-time constants: one kernel per shape, as Pallas
   compiles them), pointers declared 16-byte aligned as jax-triton declares them;
2. jaxlib's Triton dialect parses that IR, and its bytecode goes to XLA as the call's
   `ir`, with the grid, warps and stages.

The contract is `jax_triton.triton_call`'s (arrays and Python scalars in the kernel's
parameter order, outputs after them, `input_output_aliases`), so `TritonKernels` launches
either way. The IR must be one XLA's Triton can read: triton 3.6's TTIR parses in jaxlib
0.10.2. No batching rule: `TritonKernels` folds vmapped tasks into the grid itself.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

_POINTER_TYPES = {np.dtype(np.float32): "*fp32", np.dtype(jnp.bfloat16): "*bf16",
                  np.dtype(np.float16): "*fp16",
                  np.dtype(np.int32): "*i32"}


def xla_triton_call(*args, kernel, out_shape, grid, name: str = "", num_warps: int = 4,
                    num_stages: int = 2, input_output_aliases: dict[int, int] | None = None,
                    compute_capability: int | None = None, **metaparams):
    """Launch `kernel` as XLA's Triton call; `jax_triton.triton_call`'s arguments.

    Python scalars among `args` become constexprs like `metaparams`; `name` is unused (the
    kernel's own name labels it); `compute_capability` (default: the local GPU's, else 90)
    only picks the target triton builds the IR for.
    """
    del name
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    params = kernel.arg_names
    arrays, constexprs, pointers = [], dict(metaparams), {}
    for param, arg in zip(params, args, strict=False):  # then the outputs' parameters
        if isinstance(arg, (bool, int, float)):
            constexprs[param] = arg
        else:
            arrays.append(arg)
            pointers[param] = _POINTER_TYPES[np.dtype(arg.dtype)]
    for param, out in zip(params[len(args):], outs, strict=False):  # then the constexprs
        pointers[param] = _POINTER_TYPES[np.dtype(out.dtype)]
    ttir = _ttir(kernel, tuple(pointers.items()), tuple(sorted(constexprs.items())),
                 compute_capability or _local_compute_capability(), num_warps, num_stages)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    results = _xla_triton_p.bind(
        *arrays, ttir=ttir, kernel_name=kernel.__name__, grid=grid, num_warps=num_warps,
        num_stages=num_stages, out_avals=tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in outs),
        aliases=tuple(sorted((input_output_aliases or {}).items())))
    return results if isinstance(out_shape, (list, tuple)) else results[0]


def _local_compute_capability() -> int:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)  # e.g. "9.0" on a GPU
    return int(str(capability).replace(".", "")) if capability else 90


@functools.cache
def _ttir(kernel, pointers: tuple, constexprs: tuple, capability: int, num_warps: int,
          num_stages: int) -> str:
    """The kernel's Triton IR: pointers (name, "*fp32" ...) 16-byte aligned, constexprs bound."""
    import triton
    from triton.backends.compiler import GPUTarget

    pointer_types, constants = dict(pointers), dict(constexprs)
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.arg_names):
        if param in constants:
            signature[param] = "constexpr"
        else:
            signature[param] = pointer_types[param]
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants,
                                    attrs=attrs)
    with triton.knobs.cache.scope():
        # Importing jax_triton sets TRITON_CACHE_DIR="" (it keeps no cache), and then
        # triton.compile raises "Could not create or locate cache dir": use triton's default.
        if not triton.knobs.cache.dir:
            triton.knobs.cache.dir = triton.knobs.cache.get_triton_dir("cache")
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ttir"]


def _abstract_eval(*args, out_avals, **params):
    del args, params
    return list(out_avals)


def _lowering(ctx, *args, ttir, kernel_name, grid, num_warps, num_stages, out_avals, aliases):
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    context = ctx.module_context.context
    tt_dialect.register_dialect(context)
    bytecode = io.BytesIO()
    ir.Module.parse(ttir, context).operation.write_bytecode(bytecode)
    i32 = mlir.i32_attr
    return mlir.custom_call(
        call_target_name="__gpu$xla.gpu.triton",
        result_types=[mlir.aval_to_ir_type(ctx.module_context, aval) for aval in out_avals],
        operands=list(args),
        backend_config=dict(name=ir.StringAttr.get(kernel_name),
                            ir=ir.StringAttr.get(bytecode.getvalue()),
                            num_stages=i32(num_stages), num_warps=i32(num_warps),
                            grid_x=i32(grid[0]), grid_y=i32(grid[1]), grid_z=i32(grid[2]),
                            debug=ir.BoolAttr.get(False)),
        api_version=4,
        operand_output_aliases=dict(aliases),
        # The kernels index row-major arrays: without these XLA may hand the call an operand
        # in a layout of its choosing (a [1, 3, 16, 32] table as {3,1,0,2}), and on an H200
        # the kernels then read the wrong elements (5e-2 errors, non-finite bf16 params).
        operand_layouts=[_row_major(aval) for aval in ctx.avals_in],
        result_layouts=[_row_major(aval) for aval in out_avals],
    ).results


def _row_major(aval) -> list[int]:
    return list(reversed(range(aval.ndim)))


def _not_on_this_platform(ctx, *args, **params):
    del args, params
    raise NotImplementedError(
        f"launcher='xla' hands Triton kernels to XLA's GPU compiler, which runs on NVIDIA GPUs "
        f"(lowering for {ctx.module_context.platforms}); on CPU use the reference backend, or "
        f"lower with lowering_platforms=('cuda',)")


def _make_primitive():
    from jax._src.interpreters import mlir
    from jax.extend.core import Primitive

    primitive = Primitive("lopt_fast_xla_triton_call")
    primitive.multiple_results = True
    primitive.def_abstract_eval(_abstract_eval)
    mlir.register_lowering(primitive, _lowering, platform="cuda")
    mlir.register_lowering(primitive, _not_on_this_platform)  # every other platform
    return primitive


_xla_triton_p = _make_primitive()
