"""Triton (jax-triton) fused step.

* Without a GPU: every kernel compiles to sm_90 machine code with `triton.compile`
  (needs the `triton` wheel, which bundles ptxas; no driver); skipped without triton.
* With an NVIDIA GPU, `jax-triton` and `triton`: the backend against the reference,
  several steps, fresh random inputs: with float32 dots ("ieee") on every shape class and
  bf16 params at the Pallas tests' tolerances, and with the default TF32 dots at the
  TF32 tolerance. Skipped otherwise, with the reason.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast.learned import AdafacMLPLOpt, reference_update
from tests.helpers import random_theta
from tests.test_pallas_step import (
    SMALL_PACKED,
    SMALL_TILES,
    TOLERANCE,
    TREE_SHAPES,
    Tolerance,
    run_trajectories,
)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None
ON_CUDA = jax.default_backend() == "gpu"


# TF32 hidden-layer dots (the default): operands keep a 10-bit mantissa.
TF32_TOLERANCE = Tolerance({jnp.dtype(jnp.float32): (1e-5, 1e-4),
                            jnp.dtype(jnp.bfloat16): (1e-2, 1.6e-2)}, step_rel=3e-3)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed (pip install 'lopt-fast[gpu]')")
@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_kernels_compile_for_sm90(hidden_layers):
    import triton
    from triton.backends.compiler import GPUTarget

    from lopt_fast.kernels import adafac_triton as at

    mlp = dict(HP=32, NHID=hidden_layers - 1, EXP_MULT=0.001, STEP_MULT=0.001, PREC="tf32")
    cases = [
        (at._row_col_sums_kernel, {}, dict(R=16, C=32)),
        (at._factored_moments_kernel, {"p_ptr": "*bf16"}, dict(R=16, C=32)),
        (at._factored_apply_kernel, {"p_ptr": "*bf16", "po_ptr": "*bf16"}, dict(R=8, C=32, **mlp)),
        (at._packed_moments_kernel, {"cnt_ptr": "*i32"}, dict(R=2, C=128)),
        (at._packed_apply_kernel, {"seg_ptr": "*i32"}, dict(R=2, C=128, **mlp)),
    ]
    for kernel, dtypes, constexprs in cases:
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = dtypes.get(name, "*fp32")
            else:
                sig[name] = "i32"
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        assert "cubin" in compiled.asm, kernel.__name__
        if "apply" in kernel.__name__ and hidden_layers > 1:
            assert "mma" in ptx, f"{kernel.__name__}: expected tensor-core MMA for tl.dot"


@pytest.mark.skipif(not (ON_CUDA and HAVE_TRITON and HAVE_JAX_TRITON),
                    reason="needs an NVIDIA GPU with jax[cuda], jax-triton and triton")
@pytest.mark.parametrize("mlp_precision, tol, blocks, packed_blocks", [
    ("ieee", TOLERANCE, SMALL_TILES, SMALL_PACKED),  # many ragged tiles per tensor
    ("tf32", TF32_TOLERANCE, None, None),  # the defaults users run
])
def test_triton_matches_reference_every_shape_class_and_bf16(mlp_precision, tol, blocks,
                                                             packed_blocks):
    from lopt_fast.kernels import triton_update

    lopt = AdafacMLPLOpt(hidden_size=32, exp_mult=0.3, step_mult=0.01)
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    theta = random_theta(lopt, jax.random.key(seed))
    shapes = dict(TREE_SHAPES, matrix_bf16=(9, 12), bias_bf16=(5,), big=(130, 257),
                  conv=(3, 3, 32, 64), tall=(1000, 7))
    params = {k: jnp.asarray(rng.normal(size=s), jnp.bfloat16 if k.endswith("bf16") else jnp.float32)
              for k, s in shapes.items()}
    kernel = jax.jit(lambda t, s, g: triton_update(lopt, t, s, g, mlp_precision=mlp_precision,
                                                   blocks=blocks, packed_blocks=packed_blocks))
    ref = jax.jit(lambda t, s, g: reference_update(lopt, t, s, g))
    run_trajectories(lopt, theta, params, shapes, rng, kernel, ref, tol=tol)
