"""Time one jitted `AdafacMLPLOpt` reference update against `optax.adam`.

    python benchmarks/reference_update.py [--hidden-size 32] [--repeats 15] [--json out.json]

Trees: 1M parameters (a 1024x1024 matrix plus its bias) and 5M (2048x2560 plus bias).
Also times a literal port of learned_optimization's update (tile + concatenate the
39 features, normalise, one [N, 39] -> [N, H] -> [N, H] -> [N, 2] matmul chain), the
way learned_optimization computes it, so the restructuring's gain shows in the same run.
Median of repeats, compile and warm-up excluded, `block_until_ready` on every call;
Adam and the learned optimizer are timed in alternation (one call each per round).
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import optax
from timing import interleaved_median_and_iqr, median_and_iqr  # benchmarks/timing.py (run as scripts)

from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.learned import adafac_math as am

TREES = {
    "1M": {"w": (1024, 1024), "b": (1024,)},
    "5M": {"w": (2048, 2560), "b": (2560,)},
}


def _literal_features(p, g, acc):
    """The 28 features, tiled to [*p.shape, 28] as learned_optimization builds them."""
    rsqrt = jax.lax.rsqrt
    full = p.shape + (3,)
    fd = am.factored_dims(p.shape)
    if fd is None:
        v = acc.v_diag
        row = col = v
        fac_g = g[..., None] * am.safe_rsqrt(v + 1e-9)
        fac_mom = acc.mom * (v + 1e-6) ** -0.5
    else:
        d1, d0 = fd
        row = jnp.broadcast_to(jnp.expand_dims(acc.v_row, d0), full)
        col = jnp.broadcast_to(jnp.expand_dims(acc.v_col, d1), full)
        red = d1 - 1 if d1 > d0 else d1
        rf = am.safe_rsqrt(acc.v_row / (jnp.mean(acc.v_row, axis=red, keepdims=True) + 1e-9))
        factor = jnp.expand_dims(rf, d0) * jnp.expand_dims(am.safe_rsqrt(acc.v_col), d1)
        fac_g, fac_mom = g[..., None] * factor, acc.mom * factor
    r = rsqrt(acc.rms + 1e-6)
    return jnp.concatenate([g[..., None], p[..., None], acc.mom, acc.rms, acc.mom * r, r, fac_g,
                            row, col, rsqrt(row + 1e-8), rsqrt(col + 1e-8), fac_mom], -1)


def literal_update(lopt: AdafacMLPLOpt, theta, state, grad):
    """learned_optimization's way: materialise [N, 39] features, then the MLP."""
    decays = am.decays_from_theta(theta, lopt.initial_decays)
    nn = theta["nn"]["~"]

    def one(p, g, *acc):
        acc = am.update_accumulators(am.LeafAccumulators(*acc), g, decays)
        # learned_optimization keeps the decay axis last.
        x = _literal_features(p, g, am.LeafAccumulators(*(jnp.moveaxis(a, 0, -1) for a in acc)))
        axes = tuple(range(p.ndim))
        x = x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=axes, keepdims=True))
        t = jnp.broadcast_to(am.tanh_embedding(state.iteration), p.shape + (11,))
        h = jnp.concatenate([x, t], -1)
        for i in range(lopt.hidden_layers + 1):
            h = h @ nn[f"w{i}"] + nn[f"b{i}"]
            if i < lopt.hidden_layers:
                h = jax.nn.relu(h)
        step = h[..., 0] * jnp.exp(h[..., 1] * lopt.exp_mult) * lopt.step_mult
        return p - step, acc

    out = jax.tree.map(one, state.params, grad, state.mom, state.rms, state.v_row,
                       state.v_col, state.v_diag)
    return jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    parser.add_argument("--no-literal", action="store_true", help="skip the literal port")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)

    lopt = AdafacMLPLOpt(hidden_size=args.hidden_size)
    theta = lopt.init(jax.random.key(0))
    opt = lopt.opt_fn(theta, backend="reference")
    adam = optax.adam(1e-3)

    @jax.jit
    def adam_step(params, opt_state, grad):
        updates, opt_state = adam.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    lopt_step = jax.jit(opt.update)
    literal_step = jax.jit(lambda s, g: literal_update(lopt, theta, s, g))

    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__} | {jax.devices()[0].device_kind} | {cpu}"
          f" | hidden_size={args.hidden_size} | median of {args.repeats}")
    header = f"{'tree':>5} {'params':>10} {'adam ms':>9} {'lopt ms':>9} {'lopt/adam':>10} {'ns/param':>9}"
    if not args.no_literal:
        header += f" {'literal ms':>11} {'literal/adam':>13}"
    print(header)
    rows = []
    for name in args.trees:
        keys = iter(jax.random.split(jax.random.key(1), 8))
        params = {k: jax.random.normal(next(keys), s) for k, s in TREES[name].items()}
        grad = {k: jax.random.normal(next(keys), s) for k, s in TREES[name].items()}
        n = sum(x.size for x in jax.tree.leaves(params))
        state = opt.init(params, num_steps=1000)
        timed = interleaved_median_and_iqr({"adam": (adam_step, (params, adam.init(params), grad)),
                                            "lopt": (lopt_step, (state, grad))}, repeats=args.repeats)
        (adam_s, adam_iqr), (lopt_s, lopt_iqr) = timed["adam"], timed["lopt"]
        row = {"tree": name, "params": n, "adam_ms": adam_s * 1e3, "adam_iqr_ms": adam_iqr * 1e3,
               "lopt_ms": lopt_s * 1e3, "lopt_iqr_ms": lopt_iqr * 1e3, "lopt_over_adam": lopt_s / adam_s}
        line = (f"{name:>5} {n:>10,} {adam_s * 1e3:>9.2f} {lopt_s * 1e3:>9.2f} "
                f"{lopt_s / adam_s:>9.1f}x {lopt_s / n * 1e9:>9.1f}")
        if not args.no_literal:
            lit_s, _ = median_and_iqr(literal_step, state, grad, repeats=max(3, args.repeats // 3))
            row.update(literal_ms=lit_s * 1e3, literal_over_adam=lit_s / adam_s)
            line += f" {lit_s * 1e3:>11.2f} {lit_s / adam_s:>12.1f}x"
        print(line)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "hidden_size": args.hidden_size, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
