"""One Triton step per launcher against the reference, on a GPU: does each launch path run?

    python benchmarks/launcher_check.py                  # jax_triton (FFI call), legacy, xla

For each `triton_update` launcher (`lopt_fast.pallas.blocks.TRITON_LAUNCHERS`) one step of a
ragged matrix and its bias from the same state, against the reference on the same device,
prints the largest absolute difference of the new params, or the error. Exits non-zero if
the default launcher ("jax_triton", through jaxlib's FFI call) fails, so a GPU session can
fall back to `LOPT_FAST_TRITON_LAUNCHER=jax_triton_legacy` (`benchmarks/gpu_session.sh`).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.pallas.blocks import TRITON_LAUNCHERS

TOLERANCE = 1e-3  # loose: TF32 dots on both sides; catches a wrong or garbage step


def main() -> int:
    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    params = {"w": jax.random.normal(jax.random.key(1), (130, 290)), "b": jnp.full((290,), 0.1)}
    grad = jax.tree.map(lambda p: jnp.cos(7.0 * p), params)
    reference = lopt.opt_fn(theta, backend="reference")
    state = reference.init(params, num_steps=9)
    expected = jax.jit(reference.update)(state, grad).params
    from lopt_fast.kernels import triton_update

    failed = {}
    for launcher in TRITON_LAUNCHERS:
        step = jax.jit(lambda s, g, launcher=launcher: triton_update(lopt, theta, s, g,
                                                                     launcher=launcher)[0])
        try:
            got = step(state, grad)
            err = max(float(jnp.max(jnp.abs(got[k] - expected[k]))) for k in params)
            ok = bool(np.isfinite(err) and err < TOLERANCE)
            print(f"{launcher}: max |params - reference| = {err:.3e} ({'ok' if ok else 'WRONG'})")
        except Exception as e:  # noqa: BLE001 -- report every launcher
            ok = False
            print(f"{launcher}: failed: {str(e).strip().splitlines()[0][:400]}")
        if not ok:
            failed[launcher] = True
    return 1 if failed.get("jax_triton") else 0


if __name__ == "__main__":
    sys.exit(main())
