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

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None
ON_CUDA = jax.default_backend() == "gpu"

# dtype -> (atol, rtol) on new params, TF32 hidden-layer dots.
TOLERANCES = {jnp.dtype(jnp.float32): (1e-5, 1e-4), jnp.dtype(jnp.bfloat16): (1e-2, 1.6e-2)}
STEP_REL_TOL_TF32 = 3e-3


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


NEEDS_GPU = pytest.mark.skipif(not (ON_CUDA and HAVE_TRITON and HAVE_JAX_TRITON),
                               reason="needs an NVIDIA GPU with jax[cuda], jax-triton and triton")


@NEEDS_GPU
def test_triton_ieee_matches_reference_every_shape_class_and_bf16():
    from lopt_fast.kernels import triton_update
    from lopt_fast.learned import AdafacMLPLOpt, reference_update
    from tests.test_pallas_step import SMALL_PACKED, SMALL_TILES, TREE_SHAPES, random_theta, run_trajectories

    lopt = AdafacMLPLOpt(hidden_size=8, exp_mult=0.3, step_mult=0.01)
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    theta = random_theta(lopt, jax.random.key(seed))
    shapes = dict(TREE_SHAPES, matrix_bf16=(9, 12), bias_bf16=(5,))
    params = {k: jnp.asarray(rng.normal(size=s), jnp.bfloat16 if k.endswith("bf16") else jnp.float32)
              for k, s in shapes.items()}
    kernel = jax.jit(lambda t, s, g: triton_update(lopt, t, s, g, mlp_precision="ieee",
                                                   blocks=SMALL_TILES, packed_blocks=SMALL_PACKED))
    ref = jax.jit(lambda t, s, g: reference_update(lopt, t, s, g))
    run_trajectories(lopt, theta, params, shapes, rng, kernel, ref)


@NEEDS_GPU
def test_triton_tf32_matches_reference():
    from lopt_fast.kernels import triton_update
    from lopt_fast.learned import AdafacMLPLOpt, reference_update
    from tests.test_pallas_step import random_theta

    lopt = AdafacMLPLOpt(hidden_size=32, exp_mult=0.3, step_mult=0.01)
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    theta = random_theta(lopt, jax.random.key(seed))
    shapes = {"s": (), "v": (300,), "m": (130, 257), "c": (3, 3, 32, 64), "t": (1000, 7)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    opt = lopt.opt_fn(theta, backend="reference")
    ks = rs = opt.init(params, num_steps=100)
    kern = jax.jit(lambda s, g: triton_update(lopt, theta, s, g))
    ref = jax.jit(lambda s, g: reference_update(lopt, theta, s, g))
    for step in range(3):
        grad = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        (kp, kacc), (rp, racc) = kern(ks, grad), ref(rs, grad)
        for k in shapes:
            atol, rtol = TOLERANCES[jnp.dtype(jnp.float32)]
            np.testing.assert_allclose(kp[k], rp[k], atol=atol, rtol=rtol,
                                       err_msg=f"step {step} {k} shape={shapes[k]} {seed=}")
            d_ref = np.asarray(rp[k]) - np.asarray(rs.params[k])
            d_k = np.asarray(kp[k]) - np.asarray(rs.params[k])
            rel = np.linalg.norm(d_k - d_ref) / np.linalg.norm(d_ref)
            assert rel < STEP_REL_TOL_TF32, f"step {step} {k} shape={shapes[k]} step rel={rel:.2e}"
        ks = ks.replace(params=kp, mom=kacc.mom, rms=kacc.rms, v_row=kacc.v_row,
                        v_col=kacc.v_col, v_diag=kacc.v_diag, iteration=ks.iteration + 1)
        rs = rs.replace(params=rp, mom=racc.mom, rms=racc.rms, v_row=racc.v_row,
                        v_col=racc.v_col, v_diag=racc.v_diag, iteration=rs.iteration + 1)
