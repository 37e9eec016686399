"""Run the Triton backend on CPU: its kernels in Triton's interpreter, launched as jax-triton would.

jax-triton only runs on a CUDA jaxlib, so CPU tests cannot call `triton_call`. This module
stands in for it: `interpreted_triton_update` is the public `triton_update` (custom_vjp,
vmap rule, plan, launchers, grids and kernel bodies all real) with each `triton_call`
replaced by `_interpreted_call`, which launches the same `@triton.jit` kernel with the
arguments in jax-triton's order (the call's arguments as given, Python ints in place, then
one pointer per output; metaparameters as constexpr keywords) inside `jax.pure_callback`.
Outputs start as NaN, so an element that no program writes fails the comparison; an
aliased output is its input's buffer, updated in place as on a GPU.

Triton must be imported with TRITON_INTERPRET=1 already set (its own `@triton.jit`
library functions, `tl.sum` among them, are interpreted only then), so this runs in a
fresh process:

    TRITON_INTERPRET=1 python -m tests.triton_interpret --precision ieee --small-tiles

Needs `triton` and `torch` (the interpreter moves pointer arguments as torch tensors); CPU
builds of both are enough.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

# XLA may run independent callbacks on several threads; the interpreter's state is global.
_INTERPRETER_LOCK = threading.Lock()


def _to_torch(x):
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _from_torch(t):
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def _nan_torch(shape_dtype):
    import torch

    dtype = getattr(torch, jnp.dtype(shape_dtype.dtype).name)  # float32, bfloat16, ...: torch's names
    return torch.full(shape_dtype.shape, float("nan"), dtype=dtype)


def _interpreted_call(*args, kernel, out_shape, grid, name="", num_warps=None, num_stages=None,
                      input_output_aliases=None, **metaparams):
    """`jax_triton.triton_call`'s contract, run by Triton's interpreter on the host.

    An aliased output (`input_output_aliases`: array-argument index -> output index) is
    its input's buffer, as on a GPU, so the kernel updates it in place."""
    del name, num_warps, num_stages  # launch options with no meaning in the interpreter
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    is_scalar = [isinstance(a, (bool, int, float)) for a in args]
    arrays = [a for a, s in zip(args, is_scalar, strict=True) if not s]
    aliased = {o: i for i, o in (input_output_aliases or {}).items()}
    for o, i in aliased.items():
        assert (arrays[i].shape, arrays[i].dtype) == (outs[o].shape, outs[o].dtype), (i, o)

    def host(*host_arrays):
        tensors = [_to_torch(a) for a in host_arrays]
        next_tensor = iter(tensors)
        kernel_args = [a if s else next(next_tensor) for a, s in zip(args, is_scalar, strict=True)]
        out_tensors = [tensors[aliased[o]] if o in aliased else _nan_torch(out)
                       for o, out in enumerate(outs)]
        with _INTERPRETER_LOCK:
            kernel[grid](*kernel_args, *out_tensors, **metaparams)
        return [_from_torch(t) for t in out_tensors]

    results = jax.pure_callback(host, [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs],
                                *arrays)
    return results if isinstance(out_shape, (list, tuple)) else results[0]


def _round_bf16_stores_to_nearest_even():
    """Make the interpreter's float32 -> bf16 casts round to nearest even, as on a GPU.

    Triton 3.6's interpreter truncates them toward zero (`cast_impl` passes no rounding
    mode), so interpreted bf16 params drift by an ulp per step from the reference; CUDA's
    `fptrunc` (what `.to(tl.bfloat16)` lowers to) rounds to nearest even.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    truncate = InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(src.data.astype(jnp.bfloat16).view(np.uint16), dst_type.scalar)
        return truncate(self, src, dst_type)

    InterpreterBuilder.create_fp_trunc = create_fp_trunc


def _bf16_dots_from_bf16_values():
    """Make the interpreter's `tl.dot` of bfloat16 operands multiply their values.

    Triton 3.6's interpreter keeps bfloat16 tensors as their uint16 bit patterns, and its
    `create_dot` multiplies those integers. The values widened to float32 (exact), with
    a float32 product and accumulator, are what a GPU's bf16 MMA computes.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    dot = InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot


def _scalar_tensors_index():
    """Let a loop bound be a runtime scalar (`tl.range(tl.program_id(0), n, ...)`).

    Triton 3.6's interpreter holds scalars as one-element arrays and converts them to
    Python ints with `int(array)`, which NumPy >= 2.3 refuses for a 1-D array."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _pairwise_sums_in_numpy():
    """Run a `tl.reduce` whose combine function adds its operands pair by pair (the
    moments kernels' `_lanes8`) as one NumPy sum per operand.

    Triton 3.6's interpreter runs any combine function but its own sum's one element at
    a time in Python (`ReduceOps.generic_reduce`), which made the interpreted tests
    several times slower. A probe first checks that the function returns a_k + b_k for
    each operand k, so a wrong pairing still runs (and fails) the slow way."""
    import triton.language as tl
    from triton.runtime.interpreter import ReduceOps

    apply_impl = ReduceOps.apply_impl
    pairwise = {}

    def adds_pairwise(ops, count):
        key = (ops.combine_fn, count)
        if key not in pairwise:
            a = [ops.to_tensor(np.float32(1 + k), tl.float32) for k in range(count)]
            b = [ops.to_tensor(np.float32(100 * (1 + k)), tl.float32) for k in range(count)]
            out = ops.combine_fn.fn(*a, *b)
            out = out if isinstance(out, tuple) else (out,)
            pairwise[key] = len(out) == count and all(
                o.handle.data.item() == 101 * (1 + k) for k, o in enumerate(out))
        return pairwise[key]

    def patched(self, input):
        if (all(x.dtype.scalar == tl.float32 for x in input)
                and adds_pairwise(self, len(input))):
            return [self.to_tensor(np.sum(x.handle.data, axis=self.axis,
                                          keepdims=self.keep_dims), x.dtype) for x in input]
        return apply_impl(self, input)

    ReduceOps.apply_impl = patched


def _device_calls_without_repatching():
    """Call a `@triton.jit` device function (`_lanes8`, `_sq`, ...) inside a launch without
    patching `triton.language` again.

    Triton 3.6's interpreter patches the language (`_patch_lang`: `inspect.getmembers` of
    each module) at every device function call, though the launch that runs it has
    already patched the same modules, and never undoes the nested patch; that was a third
    of the interpreted tests' time. A call whose language modules are not all patched
    (no launch around it, or another module's `tl`) still takes the original path."""
    import triton.language as tl
    from triton.runtime import interpreter

    call = interpreter.InterpretedFunction.__call__
    langs = {}

    def patched(self, *args, **kwargs):
        if self.fn not in langs:
            langs[self.fn] = [v for v in self.fn.__globals__.values()
                              if inspect.ismodule(v) and v in (tl, tl.core)]
        if not langs[self.fn] or any(tl.core.is_builtin(lang.add) for lang in langs[self.fn]):
            return call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.InterpretedFunction.__call__ = patched


def _relu_casts_in_numpy():
    """Run the kernels' inline assembly, which Triton's interpreter cannot: the ReLU that
    rounds to a 16-bit dot operand (`blocks.RELU_CASTS`, PTX `cvt.rn.relu{.satfinite}`),
    in NumPy as the PTX ISA defines it: round to nearest even, negatives to 0 (NaN stays
    NaN) and, for fp16, values past its largest finite one saturated to it. Any other
    assembly still raises."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    from lopt_fast.pallas.blocks import FP16_MAX, RELU_CASTS

    class Results:  # what the interpreter's caller reads of an inline-assembly op
        def __init__(self, *handles):
            self.handles = handles

        def get_result(self, i):
            return self.handles[i]

    create_inline_asm = InterpreterBuilder.create_inline_asm

    def patched(self, asm, constraints, values, types, is_pure, pack):
        relu = np.maximum(values[0].data.astype(np.float32), 0.0)
        if asm == RELU_CASTS["fp16"]:
            with np.errstate(over="ignore"):
                return Results(TensorHandle(np.minimum(relu.astype(np.float16), FP16_MAX),
                                            tl.float16))
        if asm == RELU_CASTS["bf16"]:  # bf16 as its bit patterns, as the interpreter keeps it
            return Results(TensorHandle(relu.astype(jnp.bfloat16).view(np.uint16), tl.bfloat16))
        return create_inline_asm(self, asm, constraints, values, types, is_pure, pack)

    InterpreterBuilder.create_inline_asm = patched


def interpreted_triton_update(*args, **kwargs):
    """`triton_update` with interpreted launches (needs TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before Python starts (see the module docstring)")
    from lopt_fast.kernels import adafac_triton

    adafac_triton.TritonKernels._call = staticmethod(_interpreted_call)  # this process only
    return adafac_triton.triton_update(*args, **kwargs)


def check_against_reference(mlp_precision: str, small_tiles: bool, seed: int,
                            layer1: str = "dot", persistent: bool = False,
                            hidden_layers: int = 2):
    """The backend on every shape class and bf16 params, several steps, against the reference."""
    from lopt_fast.learned import AdafacMLPLOpt
    from tests.helpers import precise_reference
    from tests.test_pallas_step import (
        BF16_DOTS_TOLERANCE,
        SMALL_PACKED,
        SMALL_TILES,
        TF32_TOLERANCE,
        TOLERANCE,
        check_fp16_saturation,
        run_trajectories,
    )
    from tests.test_triton_step import every_shape_class

    lopt = AdafacMLPLOpt(hidden_size=32, hidden_layers=hidden_layers, exp_mult=0.3,
                         step_mult=0.01)
    # Small tiles on large shapes mean thousands of interpreted programs: small shapes there.
    theta, params, shapes, rng = every_shape_class(lopt, seed, large=not small_tiles)
    blocks, packed_blocks = (SMALL_TILES, SMALL_PACKED) if small_tiles else (None, None)
    kernel = jax.jit(lambda t, s, g: interpreted_triton_update(
        lopt, t, s, g, mlp_precision=mlp_precision, blocks=blocks, packed_blocks=packed_blocks,
        layer1=layer1, persistent=persistent))
    ref = precise_reference(lopt)
    # The interpreter ignores `input_precision` (float32 dots, so "tf32" gets the float32
    # tolerances); bf16 / fp16 operands are rounded in the kernel, so they get their own.
    tol = {"bf16": BF16_DOTS_TOLERANCE, "tf32_fp16": TF32_TOLERANCE}.get(mlp_precision,
                                                                          TOLERANCE)
    run_trajectories(lopt, theta, params, shapes, rng, kernel, ref, tol=tol)
    if mlp_precision == "tf32_fp16":
        check_fp16_saturation(lopt, functools.partial(
            interpreted_triton_update, blocks=blocks, packed_blocks=packed_blocks,
            layer1=layer1, persistent=persistent), seed)


def check_vmapped_against_reference(seed: int, tasks: int = 3, persistent: bool = False,
                                    meta_gradients: bool = True):
    """`jax.vmap` over tasks with per-task theta (folded into the kernels' grids), bf16
    params and ragged tiles, against the vmapped reference; then, if asked, meta-gradients
    of a loss after two vmapped steps (kernel forward, reference backward) against the
    reference's."""
    from lopt_fast.learned import AdafacMLPLOpt, reference_update
    from tests.helpers import precise_reference, random_theta
    from tests.test_pallas_step import (
        SMALL_PACKED,
        SMALL_TILES,
        TOLERANCE,
        TREE_SHAPES,
        VMAP_SHAPES,
        random_tree,
        run_trajectories,
    )

    lopt = AdafacMLPLOpt(hidden_size=32, exp_mult=0.3, step_mult=0.01)
    rng = np.random.default_rng(seed)
    thetas = [random_theta(lopt, jax.random.key(seed + t)) for t in range(tasks)]
    theta = jax.tree.map(lambda *xs: jnp.stack(xs), *thetas)
    shapes = {**TREE_SHAPES, **VMAP_SHAPES}
    params = random_tree(rng, shapes, lead=(tasks,))
    kernel = jax.jit(jax.vmap(lambda t, s, g: interpreted_triton_update(
        lopt, t, s, g, mlp_precision="ieee", blocks=SMALL_TILES, packed_blocks=SMALL_PACKED,
        persistent=persistent)))
    ref = precise_reference(lopt, vmapped=True)
    run_trajectories(lopt, theta, params, shapes, rng, kernel, ref, vmapped=True, tol=TOLERANCE)
    if not meta_gradients:
        return

    grad_shapes = {"w": (6, 10), "b": (4,)}
    state = jax.vmap(lambda p: lopt.opt_fn(thetas[0], backend="reference").init(
        p, num_steps=100))({k: jnp.asarray(rng.normal(size=(tasks,) + s), jnp.float32)
                            for k, s in grad_shapes.items()})
    grads = [{k: jnp.asarray(rng.normal(size=(tasks,) + s), jnp.float32)
              for k, s in grad_shapes.items()} for _ in range(2)]

    def loss(theta, update):
        s = state
        for g in grads:
            p, acc = update(theta, s, g)
            s = s.replace(params=p, mom=acc.mom, rms=acc.rms, v_row=acc.v_row,
                          v_col=acc.v_col, v_diag=acc.v_diag, iteration=s.iteration + 1)
        return sum(jnp.sum(jnp.sin(3.0 * x)) for x in jax.tree.leaves(s.params))

    vmapped_reference = jax.vmap(lambda t, s, g: reference_update(lopt, t, s, g))
    with jax.default_matmul_precision("highest"):  # float32 dots on a GPU too
        got = jax.jit(jax.grad(lambda t: loss(t, kernel)))(theta)
        want = jax.jit(jax.grad(lambda t: loss(t, vmapped_reference)))(theta)
    for (path, w), g in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(got), strict=True):
        scale = np.abs(np.asarray(w)).max()
        err = np.abs(np.asarray(g) - np.asarray(w)).max()
        assert scale > 0 and err <= 1e-4 * scale, \
            f"meta-gradient {jax.tree_util.keystr(path)}: err {err:.2e}, scale {scale:.2e}"


if __name__ == "__main__":
    from lopt_fast.pallas.blocks import LAYER1_FORMS, MLP_PRECISIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=MLP_PRECISIONS, default="tf32")
    ap.add_argument("--small-tiles", action="store_true")
    ap.add_argument("--layer1", choices=LAYER1_FORMS, default="dot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden-layers", type=int, default=2,
                    help="the MLP's hidden layers (2: one H x H layer)")
    ap.add_argument("--vmapped", action="store_true",
                    help="3 tasks with their own theta under jax.vmap (ieee, small tiles)")
    ap.add_argument("--persistent", action="store_true",
                    help="the persistent apply kernel, with 2 programs so each loops over "
                         "many tiles")
    ap.add_argument("--max-members", type=int, default=None,
                    help="at most this many small tensors per member launch (blocks.MAX_MEMBERS)")
    ap.add_argument("--x64", action="store_true",
                    help="jax_enable_x64 on: float64 theta, and float64 params among the others")
    ap.add_argument("--no-whole-planes", action="store_true",
                    help="the row / column sums pass and XLA's between-pass math even where "
                         "the planes fit one tile (PLANE_TILE_MAX = 0)")
    args = ap.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if args.no_whole_planes:
        from lopt_fast.pallas import blocks

        blocks.PLANE_TILE_MAX = 0  # this process only
        assert blocks.plane_tile([(1, 16)]) is None, "the sides pass would still run"
    if args.max_members:
        from lopt_fast.pallas import blocks

        blocks.MAX_MEMBERS = args.max_members  # this process only
    _round_bf16_stores_to_nearest_even()
    _bf16_dots_from_bf16_values()
    _scalar_tensors_index()
    _pairwise_sums_in_numpy()
    _device_calls_without_repatching()
    _relu_casts_in_numpy()
    if args.persistent:
        from lopt_fast.kernels import adafac_triton

        adafac_triton._num_sms = lambda: 1  # this process only
    if args.vmapped:
        # The backward pass is the reference's whichever kernel ran forward: its check under
        # vmap (a third of the run) is not repeated for the persistent kernel.
        check_vmapped_against_reference(args.seed, persistent=args.persistent,
                                        meta_gradients=not args.persistent)
    else:
        check_against_reference(args.precision, args.small_tiles, args.seed, args.layer1,
                                args.persistent, args.hidden_layers)
    print("interpreted Triton kernels match the reference")
