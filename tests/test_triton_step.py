"""Triton (jax-triton) fused step.

* Without a GPU: every kernel compiles to sm_90 machine code with `triton.compile`
  (needs the `triton` wheel, which bundles ptxas; no driver); skipped without triton.
* Without a GPU, with `triton` and `torch` (CPU builds): the whole backend against the
  reference with its kernels in Triton's interpreter, launched in jax-triton's argument
  order (`tests/triton_interpret.py`), on every shape class and bf16, ragged and default
  tiles, both MLP precisions (the interpreter's dots are float32), and vmapped tasks
  with per-task theta and their meta-gradients. Skipped without them.
* Without a GPU, with `triton` and, in a folder named by LOPT_FAST_CUDA_LOWERING_PATH,
  jax-triton and the jax CUDA plugin (no PJRT): the step lowers for CUDA through the real
  jax-triton, which compiles every kernel for sm_90 (`tests/triton_cuda_lowering.py`).
* With an NVIDIA GPU, `jax-triton` and `triton`: the backend against the reference,
  several steps, fresh random inputs: with float32 dots ("ieee") on every shape class and
  bf16 params at the Pallas tests' tolerances, and with the default TF32 dots at the
  TF32 tolerance. Skipped otherwise, with the reason.
"""

import importlib.util
import os
import re
import sys

import jax
import numpy as np
import pytest

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.pallas.blocks import RELU_CASTS
from tests.helpers import (
    HAVE_TRITON,
    ROOT,
    needs_triton,
    precise_reference,
    random_theta,
    run_python,
    stored_after_a_move,
)
from tests.test_pallas_step import (
    BF16_DOTS_TOLERANCE,
    KERNEL_TOLERANCE,
    SMALL_PACKED,
    SMALL_TILES,
    TF32_TOLERANCE,
    TREE_SHAPES,
    UNIT_DIM_SHAPES,
    X64_SHAPES,
    random_tree,
    run_trajectories,
)

HAVE_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
ON_CUDA = jax.default_backend() == "gpu"
CUDA_LOWERING_PATH = os.environ.get("LOPT_FAST_CUDA_LOWERING_PATH")


def every_shape_class(lopt, seed, large=True):
    """(theta, params, shapes, rng): TREE_SHAPES, UNIT_DIM_SHAPES and bf16 params, and
    unless `large` is False, shapes of several default tiles (a 3x3x32x64 conv kernel among
    them). With jax_enable_x64 on, a float64 theta and float64 params too."""
    rng = np.random.default_rng(seed)
    theta = random_theta(lopt, jax.random.key(seed))
    shapes = dict(TREE_SHAPES, **UNIT_DIM_SHAPES, matrix_bf16=(9, 12), bias_bf16=(5,))
    if jax.config.jax_enable_x64:
        theta = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
        shapes.update(X64_SHAPES)
    if large:
        shapes.update(big=(130, 257), conv=(3, 3, 32, 64), tall=(1000, 7))
    return theta, random_tree(rng, shapes), shapes, rng


@needs_triton
@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_kernels_compile_for_sm90(hidden_layers):
    from lopt_fast.kernels import adafac_triton as at

    sys.path.insert(0, os.path.join(ROOT, "profiling"))
    # builds the signature, compiles for sm_90
    from triton_resources import apply_constexprs, compile_kernel

    mlp = dict(HP=32, NHID=hidden_layers - 1, EXP_MULT=0.001, STEP_MULT=0.001, PREC="tf32")
    # Two factored tensors in one launch, [1, 130, 290] and [9, 16, 32] (B, U, V), at their
    # offsets of the flat row / column sides; bf16 params where marked.
    two = (("B", (1, 9)), ("U", (130, 16)), ("VQ", (290, 32)))
    sides = two + (("OU", (0, 130)), ("OV", (0, 290)))
    flat = dict(TU=130 + 9 * 16, TV=290 + 9 * 32)
    bf16 = {f"{x}{i}_ptr": "*bf16" for x in ("p", "g", "po") for i in range(2)}
    def apply(l1, **kw):
        constexprs = dict(mlp, **kw)
        return dict(flat, SEGS=2, **apply_constexprs(l1, 32, constexprs["PREC"]), **constexprs)
    cases = [
        (at.row_col_sums_kernel((20, 9), sides), {},
         dict(flat, NV=10, NU=2, R=16, C=32, RL=8, VA=1)),
        (at.row_col_sides_kernel((1, 9), (("B", (1, 9)), ("U", (13, 16)), ("V", (29, 32)),
                                          ("OU", (0, 13)), ("OV", (0, 29)), ("ROWU", (1, 0)))),
         {"g0_ptr": "*bf16", "g1_ptr": "*bf16"}, dict(TU=13 + 144, TV=29 + 288, R=16, C=32)),
        (at.factored_moments_kernel((12, 9), sides), bf16, dict(flat, R=16, C=32, VA=1)),
        (at.factored_apply_kernel((80, 18), sides + (("SEG", (0, 1)),)), bf16,
         dict(R=8, C=32, **apply("dot"))),
        (at.factored_apply_kernel((130, 9), sides + (("SEG", (0, 1)),)), {},
         dict(R=1, C=256, **apply("dot"))),
        (at.factored_apply_kernel((260, 18), sides + (("SEG", (0, 1)),)), {},
         dict(R=2, C=128, **apply("dot_all"))),
        (at.factored_apply_kernel((130, 9), sides + (("SEG", (0, 1)),)), {},
         dict(R=1, C=256, **apply("dot", PREC="bf16"))),
        (at.factored_apply_kernel((130, 9), sides + (("SEG", (0, 1)),)), {},
         dict(R=1, C=256, **apply("dot_all", PREC="tf32_fp16"))),
        (at.factored_apply_kernel((130, 9), sides + (("SEG", (0, 1)),), persistent=True), {},
         dict(R=1, C=256, **apply("dot_all", PREC="bf16"), TASKS=1, STAGES=2)),
        # non-factored tensors of 1, 300 and 257 elements (2x128 tiles), as one launch (a run
        # of one dtype, `blocks.member_runs`): bf16 params, then float32 ones
        (at.packed_moments_kernel((1, 300, 257), (1, 2, 2), (0, 1, 2)),
         {f"{x}{i}_ptr": "*bf16" for x in ("p", "g") for i in range(3)}, dict(R=2, C=128)),
        (at.packed_apply_kernel((1, 300), (1, 2), (3, 4)),
         {f"{x}{i}_ptr": "*bf16" for x in ("p", "g", "po") for i in range(2)},
         dict(R=2, C=128, SEGS=5, **mlp)),
        (at.packed_apply_kernel((1, 300), (1, 2), (3, 4)), {},
         dict(R=2, C=128, SEGS=5, **dict(mlp, PREC="tf32_fp16"))),
    ]
    for kernel, dtypes, constexprs in cases:
        compiled = compile_kernel(kernel, constexprs, dtypes, num_warps=4)
        ptx = compiled.asm["ptx"]
        assert "cubin" in compiled.asm, kernel.__name__
        if "apply" in kernel.__name__:  # layer 1 at least, hidden layers or not
            assert "mma" in ptx, f"{kernel.__name__}: expected tensor-core MMA for tl.dot"
        if constexprs.get("PREC") == "tf32_fp16":  # TF32 for the raw features, fp16 for the
            assert ".tf32.tf32" in ptx, kernel.__name__  # rest (the H x H and output layers)
            assert ".f16.f16" in ptx, kernel.__name__
        if "apply" in kernel.__name__ and constexprs.get("PREC") in ("tf32_fp16", "bf16"):
            # ReLU and rounding as one instruction (`blocks.RELU_CASTS`), not a cast and
            # packed max / min; the output layer as a wgmma of N = 16
            cast = RELU_CASTS["fp16" if constexprs["PREC"] == "tf32_fp16" else "bf16"]
            assert cast.split()[0] in ptx and "max.f16x2" not in ptx, kernel.__name__
            assert re.search(r"wgmma\.mma_async\S*\.m64n16k16", ptx), kernel.__name__
        if "apply" in kernel.__name__ and constexprs.get("PREC") == "tf32":
            # the H x H dot takes the accumulator before it as its operand as it stands
            # (`plan.tf32_operand_order`), not moved with shuffles
            assert "shfl.sync.idx" not in ptx, kernel.__name__
        if kernel.__name__ == "_factored_apply_kernel" and not dtypes:  # float32 params:
            # the new p in its store's layout, the step moved there (`_updated`; in the
            # persistent kernel's tile loop Triton still moves the new p)
            assert not stored_after_a_move(compiled.asm["ttgir"], "arith.subf"), kernel.__name__
        if "persistent" in kernel.__name__:  # the next tiles' loads copied asynchronously
            assert "cp.async" in ptx, f"{kernel.__name__}: the tile loop was not pipelined"


@pytest.mark.skipif(not (ON_CUDA and HAVE_TRITON), reason="needs an NVIDIA GPU with jax[cuda] and triton")
@pytest.mark.parametrize("mlp_precision, tol, blocks, packed_blocks, layer1, persistent, launcher", [
    ("ieee", KERNEL_TOLERANCE, SMALL_TILES, SMALL_PACKED, "dot", False, "jax_triton"),  # ragged tiles
    ("tf32", TF32_TOLERANCE, None, None, "dot", False, "jax_triton"),  # the defaults users run
    ("tf32", TF32_TOLERANCE, None, None, "dot_all", False, "jax_triton"),  # row / column features
    ("ieee", KERNEL_TOLERANCE, SMALL_TILES, SMALL_PACKED, "dot_all", False, "jax_triton"),
    ("bf16", BF16_DOTS_TOLERANCE, None, None, "dot", False, "jax_triton"),  # bf16 operands
    ("tf32_fp16", TF32_TOLERANCE, None, None, "dot", False, "jax_triton"),  # fp16 H x H, output layers
    ("bf16", BF16_DOTS_TOLERANCE, None, None, "dot_all", True, "jax_triton"),  # persistent apply
    ("ieee", KERNEL_TOLERANCE, SMALL_TILES, SMALL_PACKED, "dot", True, "jax_triton"),
    ("tf32", TF32_TOLERANCE, None, None, "dot", False, "jax_triton_legacy"),  # jax-triton's call
    # XLA's own Triton calls (compiled by XLA's Triton, inside CUDA graphs):
    ("ieee", KERNEL_TOLERANCE, SMALL_TILES, SMALL_PACKED, "dot", False, "xla"),
    ("tf32", TF32_TOLERANCE, None, None, "dot", False, "xla"),
    ("bf16", BF16_DOTS_TOLERANCE, None, None, "dot_all", True, "xla"),
])
def test_triton_matches_reference_every_shape_class_and_bf16(mlp_precision, tol, blocks,
                                                             packed_blocks, layer1, persistent,
                                                             launcher):
    if launcher != "xla" and not HAVE_JAX_TRITON:
        pytest.skip("jax-triton not installed (pip install 'lopt-fast[gpu]')")
    from lopt_fast.kernels import triton_update

    lopt = AdafacMLPLOpt(hidden_size=32, exp_mult=0.3, step_mult=0.01)
    theta, params, shapes, rng = every_shape_class(lopt, int(np.random.default_rng().integers(1 << 30)))
    kernel = jax.jit(lambda t, s, g: triton_update(lopt, t, s, g, mlp_precision=mlp_precision,
                                                   blocks=blocks, packed_blocks=packed_blocks,
                                                   layer1=layer1, persistent=persistent,
                                                   launcher=launcher))
    ref = precise_reference(lopt)
    run_trajectories(lopt, theta, params, shapes, rng, kernel, ref, tol=tol)


@pytest.mark.skipif(not (HAVE_TRITON and HAVE_TORCH),
                    reason="Triton's interpreter needs triton and torch (CPU builds are enough)")
@pytest.mark.parametrize("case", [["--precision", "ieee", "--small-tiles", "--max-members", "1"],
                                  ["--precision", "ieee", "--small-tiles", "--layer1", "dot_all",
                                   "--no-whole-planes"],
                                  ["--precision", "tf32"],
                                  ["--precision", "tf32", "--small-tiles", "--hidden-layers", "1"],
                                  ["--precision", "tf32", "--small-tiles", "--hidden-layers", "3"],
                                  ["--precision", "bf16", "--layer1", "dot_all"],
                                  ["--precision", "tf32_fp16", "--small-tiles", "--layer1",
                                   "dot_all"],
                                  ["--vmapped"],
                                  ["--precision", "ieee", "--small-tiles", "--persistent"],
                                  ["--vmapped", "--persistent"],
                                  ["--precision", "ieee", "--small-tiles", "--x64"]],
                         ids=["ieee-small-tiles-one-member-launches", "layer1-dot_all",
                              "tf32-default-tiles", "tf32-no-hidden-layer",
                              "tf32-two-hidden-layers", "bf16-dots-dot_all",
                              "tf32_fp16-dots-dot_all", "vmapped-tasks",
                              "persistent-small-tiles", "persistent-vmapped-tasks",
                              "x64-float64-theta-and-params"])
def test_triton_kernels_interpreted_match_reference(case):
    """Small ragged tiles with float32 dots, layer 1 in each form ("dot" with one small
    tensor per member launch: several launches per pass; "dot_all" with the row / column
    sums pass where the planes would fit one tile); the default tiles and
    code path (TF32 dots on a GPU, float32 in the interpreter); TF32 with no H x H layer
    and with two (the later layers' weights and inputs in `plan.tf32_operand_order`, so a
    missing order fails even interpreted); bf16 dot operands (the
    interpreter rounds them as a GPU does) with the row / column features in the dot;
    fp16 operands of the H x H and output layers and of the row / column features, and
    their saturation (`check_fp16_saturation`; the one-instruction ReLU casts run as
    NumPy, `_relu_casts_in_numpy`); 3
    vmapped tasks with their own theta, and meta-gradients through the custom_vjp under
    vmap (not again for the persistent kernel: the backward pass is the reference's either
    way); with jax_enable_x64, a float64 theta and float64 params. The public
    `triton_update` with interpreted launches, in a fresh process because Triton must start
    interpreted. On 2 cores running two at a time (2026-12-02): 20-26 s
    each with small tiles, 40-47 s with the default ones, 51 / 73 s vmapped."""
    seed = int(np.random.default_rng().integers(1 << 30))
    run_python(["-m", "tests.triton_interpret", *case, "--seed", str(seed)], f"seed {seed}",
               TRITON_INTERPRET="1")


@pytest.mark.skipif(not (HAVE_TRITON and CUDA_LOWERING_PATH),
                    reason="set LOPT_FAST_CUDA_LOWERING_PATH to a `pip install --no-deps --target` "
                           "of jax-triton and jax-cuda12-plugin==<jaxlib version> (.ci/run does)")
def test_triton_lowers_for_cuda_through_jax_triton():
    """Each kernel's signature as jax-triton builds it from the call, compiled for sm_90."""
    pythonpath = os.pathsep.join(p for p in (CUDA_LOWERING_PATH, os.environ.get("PYTHONPATH")) if p)
    run_python(["-m", "tests.triton_cuda_lowering"], "CUDA lowering", PYTHONPATH=pythonpath)


@needs_triton
def test_launchers_and_the_jax_triton_call_target(monkeypatch):
    """The launcher comes from the argument, else $LOPT_FAST_TRITON_LAUNCHER, else
    "jax_triton"; its launches go to jaxlib's FFI call where the CUDA plugin registers it
    (XLA can record those into CUDA graphs where jaxlib marks the handler so), else, or as
    "jax_triton_legacy", to jax-triton's legacy call (the lowered forms:
    `tests/triton_cuda_lowering.py`)."""
    from lopt_fast.kernels import adafac_triton, ffi_call
    from lopt_fast.pallas.blocks import TRITON_LAUNCHER_ENV_VAR

    monkeypatch.delenv(TRITON_LAUNCHER_ENV_VAR, raising=False)
    assert adafac_triton.resolve_launcher(None) == "jax_triton"
    monkeypatch.setenv(TRITON_LAUNCHER_ENV_VAR, "xla")
    assert adafac_triton.TritonKernels().launcher == "xla"
    assert adafac_triton.resolve_launcher("jax_triton_legacy") == "jax_triton_legacy"
    with pytest.raises(ValueError, match="launcher must be one of"):
        adafac_triton.resolve_launcher("cuda")

    monkeypatch.setattr(ffi_call, "_wrap_jax_triton_lowering", lambda: True)
    monkeypatch.setattr(ffi_call, "ffi_target_registered", lambda: False)
    assert ffi_call.call_target() == ffi_call.LEGACY_TARGET
    monkeypatch.setattr(ffi_call, "ffi_target_registered", lambda: True)
    assert ffi_call.call_target() == ffi_call.FFI_TARGET
    assert ffi_call.call_target(legacy=True) == ffi_call.LEGACY_TARGET
    monkeypatch.setattr(ffi_call, "_wrap_jax_triton_lowering", lambda: False)  # another jax-triton
    assert ffi_call.call_target() == ffi_call.LEGACY_TARGET


@needs_triton
@pytest.mark.parametrize("tasks, in_place, mlp_precision", [
    (None, True, "tf32"), (3, True, "tf32_fp16"), (3, False, "bf16")])
def test_xla_launcher_lowers_for_cuda(tasks, in_place, mlp_precision, monkeypatch):
    """launcher="xla" needs no jax-triton: triton builds each kernel's Triton IR (for sm_90,
    here on the CPU), jaxlib's Triton dialect reads it, and the step lowers for CUDA to one
    `__gpu$xla.gpu.triton` call per kernel (vmapped tasks in the grid), row-major, in place
    or not, with the 16-bit precisions' fp16 / bf16 weights (`plan.mlp_weights`);
    also after jax-triton's import has set TRITON_CACHE_DIR="" (on an H200 that made
    triton.compile raise "Could not create or locate cache dir")."""
    from lopt_fast.kernels import xla_call
    from tests import triton_cuda_lowering as lowering  # its shapes, with launcher="xla"

    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    xla_call._ttir.cache_clear()  # compile afresh, under that setting
    launches = lowering.lowered_step(mlp_precision, tasks=tasks, in_place=in_place,
                                     launcher="xla")
    assert all("__gpu$xla.gpu.triton" in line for line in launches), launches[0][:300]
    # row-major operands and results: left free, XLA gave a [1, 3, 16, 32] operand the
    # layout {3,1,0,2} and the kernels read the wrong elements (seen on an H200)
    assert all("operand_layouts" in line and "result_layouts" in line for line in launches)
    assert len(launches) == lowering.EXPECTED_LAUNCHES, len(launches)  # 3 per factored run + 2
    aliases = sum(line.count("output_operand_alias<") for line in launches)
    assert aliases == (lowering.EXPECTED_ALIASES if in_place else 0), aliases


@needs_triton
def test_small_planes_take_one_launch_before_the_moments():
    """When every factored tensor's [U, V] plane fits one tile (PLANE_TILE_MAX), one launch
    gives the new row / column accumulators and factors; larger planes take the sums pass
    (`TritonKernels.group_sides`)."""
    from tests import triton_cuda_lowering as lowering

    def names(shapes):
        launches = lowering.lowered_step(launcher="xla", shapes=shapes, tasks=2)
        return [re.search(r"name = \"(\w+)\"", line).group(1) for line in launches]

    small = names({"conv": (3, 3, 16, 32), "dense": (64, 10), "bf16": (20, 6), "bias": (10,)})
    assert small.count("_row_col_sides_kernel") == 2 and "_row_col_sums_kernel" not in small, small
    assert len(small) == 3 * 2 + 2, small  # 2 runs (float32, bf16), 2 launches for the vector
    large = names(lowering.SHAPES)
    assert "_row_col_sides_kernel" not in large and "_row_col_sums_kernel" in large, large
