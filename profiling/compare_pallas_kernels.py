"""Each Pallas launcher compiled against the same launcher in Pallas' interpreter, on a GPU.

    python profiling/compare_pallas_kernels.py

When the whole step disagrees with the reference on a GPU but not on CPU, this says
which kernel (the sides pass, or the row / column sums, moments and apply passes), which
output and which shape class (B = 1 or more, tiles that divide the tensor or not, one
tensor per launch or several, vmapped tasks) is wrong. Inputs are
fresh random values; both sides run on the default device with float32 dots ("ieee"), or
with `--precision tf32_fp16 | bf16`, whose compiled apply kernels round their ReLUs with
inline assembly where the interpreted ones use jnp (`adafac_step._relu`); dots of
TF32 / 16-bit operands sum in another order on each side, so those outputs may differ by
1e-2 of their scale (a ReLU pair rounded into the wrong halves differs by far more).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.pallas import plan
from lopt_fast.pallas.adafac_step import PallasKernels
from lopt_fast.pallas.blocks import MLP_PRECISIONS, BlockSizes, plane_tile

HP = 16
CASES = [  # one launch's members [(B, U, V), ...], tile
    ([(1, 16, 32)], BlockSizes(8, 16)),
    ([(1, 13, 29)], BlockSizes(4, 8)),
    ([(2, 16, 32), (1, 13, 29)], BlockSizes(8, 16)),
    ([(9, 5, 11)], BlockSizes(4, 8)),
    ([(2, 6, 9), (9, 5, 11), (1, 16, 32)], BlockSizes(8, 16)),
    ([(3, 8, 16)], BlockSizes(8, 16)),
]


def _group(shapes, tile) -> plan.FactoredGroup:
    """Members [B, U, V] already canonical, all in one launch of `tile`; U is the row side
    of every other member (the sides pass normalises the row side's factors)."""
    lays = tuple(plan.FactoredLayout(shape=(b, u, v), perm=None, B=b, U=u, V=v,
                                     u_is_row=j % 2 == 0, row_perm=None, col_perm=None,
                                     row_shape=(b, u), col_shape=(b, v))
                 for j, (b, u, v) in enumerate(shapes))
    return plan.FactoredGroup(lays, (tile,) * len(lays), (tile,) * len(lays))


def _inputs(key, shapes):
    k = iter(jax.random.split(key, 11 + 6 * len(shapes)))  # 11 shared, 6 per member
    n = lambda *s: jax.random.normal(next(k), s, jnp.float32)  # noqa: E731
    pos = lambda *s: jax.random.uniform(next(k), s, jnp.float32, 0.5, 2.0)  # noqa: E731
    consts = jax.random.uniform(next(k), (plan.NUM_CONSTS,), jnp.float32, 0.5, 0.99)
    mlp = plan.MLPWeights(0.3 * n(1, HP, HP), 0.1 * n(1, HP), 0.3 * n(2, HP))
    su, sv = sum(b * u for b, u, _ in shapes), sum(b * v for b, _, v in shapes)  # flat sides
    return dict(p=tuple(n(*s) for s in shapes), g=tuple(n(*s) for s in shapes),
                mom=tuple(n(3, *s) for s in shapes), rms=tuple(pos(1, *s) for s in shapes),
                fu=pos(3, su), fv=pos(3, sv), consts=consts, tu=0.3 * n(su, HP),
                tv=0.3 * n(sv, HP), w=0.3 * n(len(shapes), plan.NUM_EW_FACTORED, HP), mlp=mlp,
                new_u=pos(3, su), new_v=pos(3, sv),
                v_u=tuple(pos(3, b * u) for b, u, _ in shapes),
                v_v=tuple(pos(3, b * v) for b, _, v in shapes))


def _run(kern, name, x, group):
    if name == "sides":  # every plane of CASES fits one tile
        tile = plane_tile([(lay.U, lay.V) for lay in group.layouts])
        return kern.group_sides(x["g"], x["v_u"], x["v_v"], x["consts"], group, tile)
    if name == "row_col_sums":
        return kern.group_row_col_sums(x["g"], group)
    args = [x[a] for a in ("p", "g", "mom", "rms", "fu", "fv")]
    if name == "moments":
        return kern.group_moments(*args, x["new_u"], x["new_v"], x["consts"], group)
    return kern.group_apply(*args, x["consts"], x["tu"], x["tv"], x["w"], x["mlp"], (0.3, 0.01),
                            x["new_u"], x["new_v"], group)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=MLP_PRECISIONS, default="ieee",
                    help="the kernels' mlp_precision")
    args = ap.parse_args(argv)
    compiled, interp = PallasKernels(False, args.precision), PallasKernels(True, args.precision)
    tol = 1e-5 if args.precision == "ieee" else 1e-2
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{args.precision} dots")
    print(f"{'kernel':14s} {'[B, U, V] ...':28s} {'tile':8s} {'vmap':5s} {'output':7s} "
          f"{'max |err|':>10s} {'max |ref|':>10s}")
    bad = 0
    for shapes, blocks in CASES:
        group = _group(shapes, blocks)
        for vmapped in (False, True):
            key = jax.random.key(hash((tuple(shapes), vmapped)) % (1 << 30))
            if vmapped:
                xs = [_inputs(k, shapes) for k in jax.random.split(key, 2)]
                x = jax.tree.map(lambda *a: jnp.stack(a), *xs)
            else:
                x = _inputs(key, shapes)
            # the later layers' weights in the dtype plan hands them in (`plan.mlp_weights`;
            # their TF32 order does not matter here: both kernels take the same weights)
            dtype = plan.later_weights_dtype(compiled.mlp_precision)
            x["mlp"] = x["mlp"]._replace(**{k: plan.round_weights(getattr(x["mlp"], k), dtype)
                                            for k in ("w_hidden", "w_out_t")})
            for name in ("sides", "row_col_sums", "moments", "apply"):
                def f(kern, x, name=name, group=group):
                    return _run(kern, name, x, group)
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
                    flag = "" if err <= tol * max(scale, 1.0) else "  <-- differs"
                    bad += bool(flag)
                    print(f"{name:14s} {str(shapes):28s} {blocks.rows}x{blocks.cols:<5d} "
                          f"{str(vmapped):5s} {i:<7d} {err:10.3e} {scale:10.3e}{flag}")
    print(f"{bad} outputs differ")


if __name__ == "__main__":
    main()
