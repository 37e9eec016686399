"""One Triton step per launcher against the reference, on a GPU: does each launch path run?

    python benchmarks/launcher_check.py                  # jax_triton (FFI call), legacy, xla

For each `triton_update` launcher (`lopt_fast.pallas.blocks.TRITON_LAUNCHERS`) one step of a
ragged matrix, a 4-D conv kernel, a bf16 matrix and a bias from the same state, against the
reference on the same device: prints the worst relative error ||got - ref|| / ||ref|| over
the new params and accumulators, and where a launcher is wrong, every leaf past the
tolerance (new params: the apply pass; `v_row` / `v_col`: the sums or sides pass; the
packed bias: the vector kernels), or the error. Exits non-zero if the default launcher
("jax_triton", through jaxlib's FFI call) fails, so a GPU session can fall back to
`LOPT_FAST_TRITON_LAUNCHER=jax_triton_legacy` (`benchmarks/gpu_session.sh`).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.pallas.blocks import TRITON_LAUNCHERS

TOLERANCE = 2e-2  # loose: TF32 dots on both sides and a bf16 tensor; catches a wrong step
SHAPES = {"w": ((130, 290), jnp.float32), "conv": ((3, 3, 16, 32), jnp.float32),
          "w_bf16": ((64, 96), jnp.bfloat16), "b": ((290,), jnp.float32)}


def _errors(got, want) -> dict[str, float]:
    """Relative error of each leaf of (new params, accumulators), by its path."""
    out = {}
    for (path, w), g in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(got), strict=True):
        if np.size(w):
            w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
            den = max(float(np.linalg.norm(w64)), 1e-30)
            out[jax.tree_util.keystr(path)] = float(np.linalg.norm(g64 - w64)) / den
    return out


def main() -> int:
    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 2 * len(SHAPES)))
    params = {k: jax.random.normal(next(keys), s).astype(d) for k, (s, d) in SHAPES.items()}
    grad = {k: jax.random.normal(next(keys), p.shape).astype(p.dtype) for k, p in params.items()}
    from lopt_fast.learned.adafac_mlp import reference_update

    state = lopt.opt_fn(theta, backend="reference").init(params, num_steps=9)
    expected = jax.jit(lambda s, g: reference_update(lopt, theta, s, g))(state, grad)
    from lopt_fast.kernels import triton_update

    failed = {}
    for launcher in TRITON_LAUNCHERS:
        step = jax.jit(lambda s, g, launcher=launcher: triton_update(lopt, theta, s, g,
                                                                     launcher=launcher))
        try:
            errors = _errors(step(state, grad), expected)
            worst = max(errors, key=lambda k: errors[k] if np.isfinite(errors[k]) else np.inf)
            bad = {k: e for k, e in errors.items() if not (np.isfinite(e) and e < TOLERANCE)}
            print(f"{launcher}: worst relative error {errors[worst]:.3e} at {worst} "
                  f"({'WRONG' if bad else 'ok'})")
            for k, e in bad.items():
                print(f"    {k}: {e:.3e}")
            ok = not bad
        except Exception as e:  # noqa: BLE001 -- report every launcher
            ok = False
            print(f"{launcher}: failed: {str(e).strip().splitlines()[0][:400]}")
        if not ok:
            failed[launcher] = True
    return 1 if failed.get("jax_triton") else 0


if __name__ == "__main__":
    sys.exit(main())
