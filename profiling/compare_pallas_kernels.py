"""Each Pallas launcher compiled against the same launcher in Pallas' interpreter, on a GPU.

    python profiling/compare_pallas_kernels.py

When the whole step disagrees with the reference on a GPU but not on CPU, this says
which kernel, which output and which shape class (B = 1 or more, tiles that divide the
tensor or not, vmapped tasks) is wrong. Inputs are fresh random values; both sides run
on the default device with float32 dots ("ieee").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.pallas import plan
from lopt_fast.pallas.adafac_step import PallasKernels
from lopt_fast.pallas.blocks import BlockSizes

HP = 16
CASES = [  # (B, U, V), tile
    ((1, 16, 32), BlockSizes(8, 16)),
    ((1, 13, 29), BlockSizes(4, 8)),
    ((2, 16, 32), BlockSizes(8, 16)),
    ((9, 5, 11), BlockSizes(4, 8)),
    ((2, 6, 9), BlockSizes(8, 16)),
    ((3, 8, 16), BlockSizes(8, 16)),
]


# The tensor's rows and columns sit at these offsets of longer flat sides (another
# tensor's before them, and after), as in a step of several factored tensors.
OFFSETS = (5, 7)
TRAILING = 3


def _inputs(key, b, u, v):
    k = iter(jax.random.split(key, 16))
    n = lambda *s: jax.random.normal(next(k), s, jnp.float32)  # noqa: E731
    pos = lambda *s: jax.random.uniform(next(k), s, jnp.float32, 0.5, 2.0)  # noqa: E731
    consts = jax.random.uniform(next(k), (plan.NUM_CONSTS,), jnp.float32, 0.5, 0.99)
    mlp = plan.MLPWeights(0.3 * n(1, HP, HP), 0.1 * n(1, HP), 0.3 * n(2, HP))
    su, sv = OFFSETS[0] + b * u + TRAILING, OFFSETS[1] + b * v + TRAILING  # flat side lengths
    return dict(p=n(b, u, v), g=n(b, u, v), mom=n(3, b, u, v), rms=pos(1, b, u, v),
                fu=pos(3, su), fv=pos(3, sv), consts=consts, tu=0.3 * n(su, HP),
                tv=0.3 * n(sv, HP), w_ew=0.3 * n(plan.NUM_EW_FACTORED, HP), mlp=mlp,
                new_u=pos(3, su), new_v=pos(3, sv))


def _run(kern, name, x, blocks):
    if name == "row_col_sums":
        return kern.row_col_sums(x["g"], blocks)
    args = [x[a] for a in ("p", "g", "mom", "rms", "fu", "fv", "consts")]
    if name == "moments":
        return kern.factored_moments(*args, OFFSETS, blocks)
    return kern.factored_apply(*args, x["tu"], x["tv"], x["w_ew"], x["mlp"], (0.3, 0.01),
                               x["new_u"], x["new_v"], OFFSETS, blocks)


def main():
    compiled, interp = PallasKernels(False, "ieee"), PallasKernels(True, "ieee")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'kernel':14s} {'[B, U, V]':14s} {'tile':8s} {'vmap':5s} {'output':7s} "
          f"{'max |err|':>10s} {'max |ref|':>10s}")
    bad = 0
    for shape, blocks in CASES:
        for vmapped in (False, True):
            key = jax.random.key(hash((shape, vmapped)) % (1 << 30))
            if vmapped:
                xs = [_inputs(k, *shape) for k in jax.random.split(key, 2)]
                x = jax.tree.map(lambda *a: jnp.stack(a), *xs)
            else:
                x = _inputs(key, *shape)
            for name in ("row_col_sums", "moments", "apply"):
                def f(kern, x, name=name, blocks=blocks):
                    return _run(kern, name, x, blocks)
                if vmapped:
                    got = jax.jit(jax.vmap(lambda x, f=f: f(compiled, x)))(x)
                    want = jax.jit(jax.vmap(lambda x, f=f: f(interp, x)))(x)
                else:
                    got = jax.jit(lambda x, f=f: f(compiled, x))(x)
                    want = jax.jit(lambda x, f=f: f(interp, x))(x)
                for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                               strict=True)):
                    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                    err = np.abs(a - b).max() if a.size else 0.0
                    scale = np.abs(b).max() if b.size else 0.0
                    flag = "" if err <= 1e-5 * max(scale, 1.0) else "  <-- differs"
                    bad += bool(flag)
                    print(f"{name:14s} {str(list(shape)):14s} {blocks.rows}x{blocks.cols:<5d} "
                          f"{str(vmapped):5s} {i:<7d} {err:10.3e} {scale:10.3e}{flag}")
    print(f"{bad} outputs differ")


if __name__ == "__main__":
    main()
